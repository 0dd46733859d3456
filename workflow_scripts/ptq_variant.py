from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import EvaluationConfig, ModelConfig, PtqConfig, QuantConfig, Runtime  # noqa: E402
from mpqflow.stages.ptq import ptq_variant  # noqa: E402

p = snakemake.params
ptq_variant(
    snakemake.wildcards.variant,
    ModelConfig.from_dict(p.model),
    QuantConfig.from_dict(p.quant),
    PtqConfig.from_dict(p.ptq),
    p.seed,
    EvaluationConfig.from_dict(p.evaluation),
    Runtime.of_job(snakemake.config, snakemake.threads),
    snakemake.input.model,
    snakemake.output.metrics,
)
