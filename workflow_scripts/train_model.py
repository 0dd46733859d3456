from mpqflow.io import setup_logging
from mpqflow.pipeline import stage_config, train_or_load

setup_logging(snakemake.log[0])
cfg = stage_config(snakemake.params.cfg, snakemake.config, snakemake.threads)
train_or_load(cfg, snakemake.wildcards.model, snakemake.output.model)
