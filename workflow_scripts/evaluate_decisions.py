from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import EvaluationConfig, ModelConfig, QuantConfig, Runtime, SamplePlanConfig  # noqa: E402
from mpqflow.stages.evaluate import evaluate_decisions  # noqa: E402

p = snakemake.params
evaluate_decisions(
    ModelConfig.from_dict(p.model),
    QuantConfig.from_dict(p.quant),
    SamplePlanConfig.from_dict(p.plan),
    EvaluationConfig.from_dict(p.evaluation),
    Runtime.of_job(snakemake.config, snakemake.threads),
    snakemake.input.model,
    snakemake.input.calibration,
    list(snakemake.input.decisions),
    list(snakemake.output),
    masks=snakemake.input.get("masks"),  # a limpq set file when limpq.prune is on
)
