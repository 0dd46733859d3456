from mpqflow.io import setup_logging
from mpqflow.sensitivity.jobs import pool_set

setup_logging(snakemake.log[0])
pool_set(list(snakemake.input.batches), snakemake.output.pooled)
