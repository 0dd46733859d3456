from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import ModelConfig, QuantConfig, Runtime, SamplePlanConfig  # noqa: E402
from mpqflow.stages.sensitivity import sensitivity_batch  # noqa: E402

p = snakemake.params
# The pool's size only bounds the batch index (batch b's samples do not depend on it): not a param,
# so growing the pool keeps every finished batch.
plan = SamplePlanConfig(**p.plan, pool_batches=snakemake.config["sensitivity"]["pool_batches"])
sensitivity_batch(
    ModelConfig.from_dict(p.model),
    QuantConfig.from_dict(p.quant),
    plan,
    dict(p.settings),
    Runtime.of_job(snakemake.config, snakemake.threads),
    snakemake.input.model,
    snakemake.input.calibration,
    snakemake.wildcards.estimator,
    int(snakemake.wildcards.batch),
    snakemake.output.batch,
)
