from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import LimpqConfig, ModelConfig, QuantConfig, Runtime, SamplePlanConfig  # noqa: E402
from mpqflow.stages.limpq_indicators import run_limpq_indicators  # noqa: E402

p = snakemake.params
job = dict(
    model=ModelConfig.from_dict(p.model),
    quant=QuantConfig.from_dict(p.quant),
    seed=p.seed,
    # the pool's size only bounds the batch ids (as in sensitivity_batch.py): not a param
    plan=SamplePlanConfig(**p.plan, pool_batches=snakemake.config["sensitivity"]["pool_batches"]),
    settings=LimpqConfig.from_dict(dict(p.settings)),
    checkpoint=snakemake.input.model,
    calibration=snakemake.input.calibration,
    set_size=int(snakemake.wildcards.n),
    set_id=int(snakemake.wildcards.s),
    batches=p.batches,
    out_path=snakemake.output.indicators,
    state_dir=p.state_dir,
)
# threads: the whole job's (limpq_threads: world_size x config threads); each rank gets its share
run_limpq_indicators(job, Runtime.of_job(snakemake.config, snakemake.threads))
