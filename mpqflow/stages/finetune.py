"""Stage `finetune`: LSQ quantization-aware fine-tuning of a searched decision (or a uniform option).

Usage (workflow_scripts/finetune.py; `job` holds finetune()'s arguments but `env`: typed config
sections and JSON-ready values, which the launcher hands to torchrun's workers too):
    record = run_finetune(dict(model=model_cfg, quant=quant_cfg, seed=0, settings=finetune_cfg,
                               checkpoint="results/m/model.pt", calibration="results/m/calibration.pt",
                               target={"decision": ".../avg_bits-2.5.json"},   # or {"option": "w2a4"}
                               outputs={"model": ..., "export": ..., "export_meta": ...},
                               state_dir="results/m/.finetune_state/..."),
                          Runtime("cpu", threads=2, collective_timeout_s=600.0))
    net = mpqflow.finetuned.load_finetuned("results/m/finetuned/clado/set_4x0/avg_bits-2.5.pt")

run_finetune starts `finetune.world_size` ranks (:func:`mpqflow.train.launch`: this process for one,
torchrun for several), each running :func:`finetune`.

The steps start from the calibrated PTQ quantizer (weights: its per-channel scales; inputs: its
scale, exactly where the input grid has zero point 0, e.g. after a ReLU), so fine-tuning starts from
the PTQ model. Every layer of the decision is fine-tuned at its bits, the fixed first and last layers
included. Rank 0 writes the outputs: the fine-tuned model (with a record of what was fine-tuned and
how) and its integer export. The held-out evaluation is stage `evaluate`'s
(:func:`mpqflow.stages.evaluate.evaluate_finetuned`), so neither an evaluation setting nor the
evaluation code retrains anything.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from ..artifacts import decision_assignment, load_decision
from ..codehash import code_hash
from ..config import FinetuneConfig, ModelConfig, QuantConfig, Runtime
from ..context import load_context
from ..finetuned import read_finetuned, save_finetuned
from ..indicators import read_prune_masks
from ..names import parse_option
from ..quant import prepare_lsq, save_export
from ..quant.prune import bake_masks, keep_masks, sparsity
from ..train import fit, launch, step_sizes_without_decay
from ..train.losses import distillation_loss
from ..train.state import clear_state

__all__ = ["run_finetune", "finetune"]
log = logging.getLogger("mpqflow")


def _assignment(ctx, target: dict) -> tuple[dict, dict]:
    """(full assignment, record fields naming the target) of a decision file or a uniform option."""
    if "decision" in target:
        d = load_decision(target["decision"], ctx.table)
        fields = {k: d[k] for k in ("method", "budget", "set_size", "set_id")} | {"choice": " ".join(d["choice"])}
        return decision_assignment(d, ctx.table), fields
    option = parse_option(target["option"])
    if option not in ctx.table.options:
        raise ValueError(f"finetune target option {target['option']!r} is not in the option table")
    return ctx.table.uniform_assignment(option), {"method": "uniform", "option": target["option"]}


def run_finetune(job: dict, runtime: Runtime) -> dict:
    """Fine-tune on `job["settings"]["world_size"]` processes sharing `runtime.threads`; the saved record.
    The workers' output goes to this process's stderr (the rule's log after io.setup_logging)."""
    job = {"tag": code_hash(__name__), **job}  # an epoch checkpoint of other fine-tuning code is not resumed
    world_size = job["settings"].world_size
    launch(f"{__name__}:finetune", job, world_size, threads=runtime.threads,
           timeout_s=runtime.collective_timeout_s, device=runtime.device)  # fmt: skip
    return read_finetuned(job["outputs"]["model"])["record"]


def finetune(
    *,
    model: ModelConfig,
    quant: QuantConfig,
    seed: int,
    settings: FinetuneConfig,
    checkpoint: str,
    calibration: str,
    target: dict,
    outputs: dict,
    state_dir: str | None,
    masks: str | None = None,
    tag: str = "",
    env,
) -> dict | None:
    """Fine-tune one target on this rank; rank 0 writes `outputs` (model, export, export_meta) and
    returns the model's record (what was fine-tuned, how, in how long), the other ranks return None.

    Args:
        settings: the fine-tuning's settings (epochs, batch_size, lr, ..., distill, temperature,
            weight_init: the validated `finetune` section without its targets).
        target: {"decision": path of a decision JSON} or {"option": "w2a4"} (uniform).
        state_dir: the epoch checkpoints (resume after a kill); removed once the outputs exist.
        masks: a limpq set file whose LIMPQP pruning masks the fine-tuning keeps (pruned weights stay 0).
        tag: what else identifies the run for resuming (the stage's code hash).
    """
    t0 = time.perf_counter()
    ft, model_cfg, quant_cfg = settings, model, quant
    ctx = load_context(
        model_cfg,
        quant_cfg,
        seed,
        Runtime(str(env.device), torch.get_num_threads(), env.timeout_s),
        checkpoint,
        calibration,
    )
    assignment, fields = _assignment(ctx, target)
    if env.is_main:
        log.info("fine-tuning %s on %d process(es): %s", fields, env.world_size, ft.to_dict())
    teacher = copy.deepcopy(ctx.net).eval() if ft.distill > 0 else None
    per_channel = quant_cfg.weight["granularity"] == "per_channel"
    net = prepare_lsq(ctx.net, assignment, quantizer=ctx.quantizer, weight_init=ft.weight_init, per_channel=per_channel)
    if masks is not None:
        layer_masks = read_prune_masks(masks)
        keep_masks(net, layer_masks)  # torch's reparametrisation: the optimizer updates weight_orig only
        fields["pruned_fraction"] = sparsity(layer_masks)
    train = ft.train_settings()
    fit(
        net,
        ctx.train_set,
        train,
        seed=seed,
        env=env,
        loss_fn=distillation_loss(teacher, ft.distill, ft.temperature),
        state_dir=state_dir,
        desc="finetune",
        param_groups=step_sizes_without_decay(net, train.weight_decay),
        tag=f"{tag} {sorted(assignment.items())}",
    )
    if not env.is_main:
        return None
    bake_masks(net)  # plain weights with the zeros in: the saved model rebuilds without the masks
    spec = ctx.spec
    build = {"arch": model_cfg.arch, "in_channels": spec.in_channels, "image_size": spec.input_size,
             "num_classes": model_cfg.num_classes or spec.num_classes}  # fmt: skip
    record = {**fields, "epochs": train.epochs, "world_size": env.world_size, "distill": ft.distill,
              "train_seconds": time.perf_counter() - t0}  # fmt: skip
    save_finetuned(outputs["model"], net, build, per_channel, record, ctx.checkpoint_sha256, ctx.table.folded_bn)
    save_export(outputs["export"], outputs["export_meta"], net, ctx.table.folded_bn)
    log.info("fine-tuned %s in %.0f s on %d process(es)", fields, record["train_seconds"], env.world_size)
    clear_state(state_dir)
    return record
