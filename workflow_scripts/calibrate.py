from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import ModelConfig, QuantConfig, Runtime, SamplePlanConfig  # noqa: E402
from mpqflow.stages.calibrate import calibrate  # noqa: E402

p = snakemake.params
calibrate(
    ModelConfig.from_dict(p.model),
    QuantConfig.from_dict(p.quant),
    p.seed,
    Runtime.of_job(snakemake.config, snakemake.threads),
    snakemake.input.model,
    snakemake.output.calibration,
    snakemake.output.layers,
    plan=SamplePlanConfig.of(snakemake.config),  # checked here, not a param: a larger pool must not recalibrate
)
