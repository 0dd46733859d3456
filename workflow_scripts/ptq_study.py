from mpqflow.io import setup_logging
from mpqflow.ptq import ptq_study

setup_logging(snakemake.log[0])
ptq_study(list(snakemake.input), snakemake.output.table, snakemake.output.plot, snakemake.params.plots)
