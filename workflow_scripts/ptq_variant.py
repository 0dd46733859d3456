from mpqflow.io import setup_logging
from mpqflow.pipeline import stage_config
from mpqflow.ptq import ptq_variant

setup_logging(snakemake.log[0])
cfg = stage_config(snakemake.params.cfg, snakemake.config, snakemake.threads)
ptq_variant({**cfg, "variant": snakemake.wildcards.variant}, snakemake.wildcards.model,
            snakemake.input.model, snakemake.output.metrics)
