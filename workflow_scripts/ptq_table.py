from mpqflow.io import setup_logging
from mpqflow.ptq import write_ptq_table

setup_logging(snakemake.log[0])
write_ptq_table(list(snakemake.input), snakemake.output.table)
