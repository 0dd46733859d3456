from mpqflow.io import setup_logging
from mpqflow.pipeline import calibrate, stage_config

setup_logging(snakemake.log[0])
cfg = stage_config(snakemake.params.cfg, snakemake.config, snakemake.threads)
calibrate(cfg, snakemake.wildcards.model, snakemake.input.model, snakemake.output.calibration)
