from mpqflow.io import setup_logging
from mpqflow.pipeline import stage_config
from mpqflow.sensitivity.jobs import sensitivity_batch

setup_logging(snakemake.log[0])
cfg = stage_config({**snakemake.params.cfg, "sensitivity": snakemake.params.sensitivity}, snakemake.config, snakemake.threads)
sensitivity_batch(cfg, snakemake.wildcards.model, snakemake.input.model, snakemake.input.calibration,
                  snakemake.wildcards.estimator, int(snakemake.wildcards.batch), snakemake.output.batch)
