from mpqflow.io import setup_logging
from mpqflow.pipeline import stage_config
from mpqflow.search import evaluate_decision

setup_logging(snakemake.log[0])
cfg = stage_config(snakemake.params.cfg, snakemake.config, snakemake.threads)
evaluate_decision(cfg, snakemake.wildcards.model, snakemake.input.model, snakemake.input.calibration,
                  snakemake.input.decision, snakemake.output.metrics)
