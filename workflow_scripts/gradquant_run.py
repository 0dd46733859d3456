from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import EvaluationConfig, ModelConfig, Runtime  # noqa: E402
from mpqflow.stages.gradquant import run_gradquant  # noqa: E402

p = snakemake.params
run_gradquant(
    ModelConfig.from_dict(p.model),
    p.spec,
    snakemake.wildcards.run,
    seed=p.seed,
    evaluation=EvaluationConfig.from_dict(p.evaluation),
    # threads: the whole job's (world_size x config threads); each rank gets its share
    runtime=Runtime.of_job(snakemake.config, snakemake.threads),
    out_path=snakemake.output.run,
    state_dir=p.state_dir,
)
