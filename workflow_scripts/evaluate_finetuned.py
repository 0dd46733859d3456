from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import EvaluationConfig, ModelConfig, QuantConfig, Runtime  # noqa: E402
from mpqflow.stages.evaluate import evaluate_finetuned  # noqa: E402

p = snakemake.params
evaluate_finetuned(
    ModelConfig.from_dict(p.model),
    QuantConfig.from_dict(p.quant),
    p.seed,
    EvaluationConfig.from_dict(p.evaluation),
    Runtime.of_job(snakemake.config, snakemake.threads),
    snakemake.input.model,
    snakemake.input.calibration,
    snakemake.input.finetuned,
    snakemake.output.eval,
)
