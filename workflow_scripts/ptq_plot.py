from mpqflow.io import setup_logging
from mpqflow.ptq import plot_ptq_table

setup_logging(snakemake.log[0])
plot_ptq_table(snakemake.input.table, snakemake.output.plot, snakemake.params.plots)
