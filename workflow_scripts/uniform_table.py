from mpqflow.io import setup_logging
from mpqflow.study import uniform_table

setup_logging(snakemake.log[0])
uniform_table(list(snakemake.input), snakemake.output.table)
