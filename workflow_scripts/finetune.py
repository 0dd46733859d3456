from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import FinetuneConfig, ModelConfig, QuantConfig, Runtime  # noqa: E402
from mpqflow.stages.finetune import run_finetune  # noqa: E402

p, out = snakemake.params, snakemake.output
target = {"decision": snakemake.input.decision} if p.option is None else {"option": p.option}
job = dict(
    model=ModelConfig.from_dict(p.model),
    quant=QuantConfig.from_dict(p.quant),
    seed=p.seed,
    settings=FinetuneConfig.from_dict(p.settings),
    checkpoint=snakemake.input.model,
    calibration=snakemake.input.calibration,
    target=target,
    outputs={"model": out.model, "export": out.export, "export_meta": out.export_meta},
    state_dir=p.state_dir,
    masks=snakemake.input.get("masks"),  # a limpq set file when limpq.prune is on
)
# threads: the whole job's (finetune_threads: world_size x config threads); each rank gets its share
run_finetune(job, Runtime.of_job(snakemake.config, snakemake.threads))
