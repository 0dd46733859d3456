from mpqflow.io import save_json, setup_logging
from mpqflow.pipeline import evaluate_uniform, stage_config

setup_logging(snakemake.log[0])
cfg = stage_config(snakemake.params.cfg, snakemake.config, snakemake.threads)
metrics = evaluate_uniform(cfg, snakemake.wildcards.model, snakemake.input.model,
                           snakemake.input.calibration, snakemake.wildcards.option)
save_json(snakemake.output.metrics, metrics)
