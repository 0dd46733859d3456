from mpqflow.io import setup_logging
from mpqflow.study import study_table

setup_logging(snakemake.log[0])
study_table(list(snakemake.input.uniform), list(snakemake.input.evals), snakemake.output.table)
