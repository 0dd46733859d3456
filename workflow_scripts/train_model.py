from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import EvaluationConfig, ModelConfig, Runtime  # noqa: E402
from mpqflow.stages.train import train_or_load  # noqa: E402

p = snakemake.params
train_or_load(
    ModelConfig.from_dict(p.model),
    p.seed,
    # The FP metrics' batch size is an execution detail (top-1 does not depend on it), not a param:
    # changing evaluation.batch_size must not retrain the model and invalidate everything after it.
    EvaluationConfig.from_dict(snakemake.config["evaluation"]),
    # threads: the whole job's (train_threads: world_size x config threads); each rank gets its share
    Runtime.of_job(snakemake.config, snakemake.threads),
    snakemake.output.model,
    state_dir=p.state_dir,
)
