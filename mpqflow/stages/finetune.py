"""Stage `finetune`: LSQ quantization-aware fine-tuning of a searched decision (or a uniform option).

Usage (what workflow_scripts/finetune.py runs on `finetune.world_size` ranks through
:func:`mpqflow.train.launch`; every argument is JSON-able so torchrun's workers get them too):
    launch("mpqflow.stages.finetune:finetune", dict(model=model_dict, quant=quant_dict, seed=0,
           settings=finetune_dict, evaluation=evaluation_dict, checkpoint="results/m/model.pt",
           calibration="results/m/calibration.pt", target={"decision": ".../avg_bits-2.5.json"},
           outputs={"model": ..., "eval": ..., "export": ..., "export_meta": ...},
           state_dir="results/m/.finetune_state/...", tag=code_hash), world_size, threads=2)
    net = load_finetuned("results/m/finetuned/clado/set_4x0/avg_bits-2.5.pt")   # rebuilt, eval mode

The steps start from the calibrated PTQ quantizer (weights: its per-channel scales; inputs: its
scale, exactly where the input grid has zero point 0, e.g. after a ReLU), so fine-tuning starts from
the PTQ model. Every layer of the decision is fine-tuned at its bits, the fixed first and last layers
included. Rank 0 writes the outputs: the fine-tuned model, its integer export and its evaluation in
the eval/ schema.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
import torch.nn.functional as F

from ..artifacts import decision_assignment, fp_metrics, load_decision
from ..checkpoints import torch_load
from ..config import EvaluationConfig, ModelConfig, QuantConfig, Runtime, TrainSettings
from ..context import load_context
from ..evaluate import evaluate_lsq_model
from ..io import save_json, save_torch
from ..models import build_model
from ..names import parse_option
from ..quant import prepare_lsq, save_export
from ..train import fit
from ..train.state import clear_state

__all__ = ["finetune", "load_finetuned", "distillation_loss", "FINETUNED_FORMAT"]
log = logging.getLogger("mpqflow")
FINETUNED_FORMAT = "mpqflow-finetuned/1"


def distillation_loss(teacher: torch.nn.Module, weight: float, temperature: float):
    """loss_fn for :func:`mpqflow.train.fit`: (1 - weight) * CE + weight * T^2 * KL(teacher || student)
    on logits softened by T (Hinton et al.); weight 0 is plain cross-entropy."""

    def loss_fn(model, x, y):
        logits = model(x)  # (B, classes)
        loss = F.cross_entropy(logits, y)
        if weight == 0:
            return loss, logits
        with torch.no_grad():
            target = F.log_softmax(teacher(x) / temperature, dim=1)
        kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="batchmean", log_target=True)
        return (1 - weight) * loss + weight * temperature**2 * kl, logits

    return loss_fn


def _param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weights with weight decay, LSQ step sizes without (decay would pull every step to zero)."""
    steps = [p for n, p in net.named_parameters() if n.endswith(".step")]
    others = [p for n, p in net.named_parameters() if not n.endswith(".step")]
    return [{"params": others, "weight_decay": weight_decay}, {"params": steps, "weight_decay": 0.0}]


def _train_settings(s: dict) -> TrainSettings:
    keys = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "augment_shift", "world_size", "amp")
    return TrainSettings(**{k: s[k] for k in keys})


def _assignment(ctx, target: dict) -> tuple[dict, dict]:
    """(full assignment, eval fields naming the target) of a decision file or a uniform option."""
    if "decision" in target:
        d = load_decision(target["decision"], ctx.table)
        fields = {k: d[k] for k in ("method", "budget", "set_size", "set_id")} | {"choice": " ".join(d["choice"])}
        return decision_assignment(d, ctx.table), fields
    option = parse_option(target["option"])
    if option not in ctx.table.options:
        raise ValueError(f"finetune target option {target['option']!r} is not in the option table")
    return ctx.table.uniform_assignment(option), {"method": "uniform", "option": target["option"]}


def finetune(
    *,
    model: dict,
    quant: dict,
    seed: int,
    settings: dict,
    evaluation: dict,
    checkpoint: str,
    calibration: str,
    target: dict,
    outputs: dict,
    state_dir: str | None,
    tag: str = "",
    env,
) -> dict | None:
    """Fine-tune one target on this rank; rank 0 evaluates and writes `outputs` (model, eval, export,
    export_meta) and returns the evaluation, the other ranks return None.

    Args:
        settings: the validated `finetune` section (epochs, batch_size, lr, ..., distill, temperature,
            weight_init).
        target: {"decision": path of a decision JSON} or {"option": "w2a4"} (uniform).
        state_dir: the epoch checkpoints (resume after a kill); removed once the outputs exist.
        tag: what else identifies the run for resuming (the stage's code hash).
    """
    t0 = time.perf_counter()
    model_cfg, quant_cfg = ModelConfig.from_dict(model), QuantConfig.from_dict(quant)
    ctx = load_context(
        model_cfg, quant_cfg, seed, Runtime(str(env.device), torch.get_num_threads()), checkpoint, calibration
    )
    assignment, fields = _assignment(ctx, target)
    teacher = copy.deepcopy(ctx.net).eval() if settings["distill"] > 0 else None
    per_channel = quant_cfg.weight["granularity"] == "per_channel"
    net = prepare_lsq(
        ctx.net, assignment, quantizer=ctx.quantizer, weight_init=settings["weight_init"], per_channel=per_channel
    )
    train = _train_settings(settings)
    fit(
        net,
        ctx.train_set,
        train,
        seed=seed,
        env=env,
        loss_fn=distillation_loss(teacher, settings["distill"], settings["temperature"]),
        state_dir=state_dir,
        desc="finetune",
        param_groups=_param_groups(net, train.weight_decay),
        tag=f"{tag} {sorted(assignment.items())}",
    )
    if not env.is_main:
        return None
    metrics = evaluate_lsq_model(
        net, ctx.table, ctx.test_set, EvaluationConfig.from_dict(evaluation).batch_size, env.device, ctx.workers
    )
    fp = fp_metrics(checkpoint)
    metrics.update(fields, fp_top1=fp["top1"], fp_loss=fp["loss"], epochs=train.epochs, world_size=env.world_size,
                   distill=settings["distill"], seconds=time.perf_counter() - t0)  # fmt: skip
    net = net.cpu().eval()
    spec = ctx.spec
    build = {"arch": model_cfg.arch, "in_channels": spec.in_channels, "image_size": spec.input_size,
             "num_classes": model_cfg.num_classes or spec.num_classes}  # fmt: skip
    save_torch(outputs["model"], {
        "format": FINETUNED_FORMAT, "build": build, "per_channel": per_channel, "state_dict": net.state_dict(),
        "assignment": {l: list(o) for l, o in assignment.items()}, "metrics": metrics,
        "checkpoint_sha256": ctx.checkpoint_sha256,
    })  # fmt: skip
    save_export(outputs["export"], outputs["export_meta"], net)
    save_json(outputs["eval"], metrics)
    log.info(
        "%s: top1 %.4f after %d epochs of fine-tuning (%.0f s)",
        fields,
        metrics["top1"],
        train.epochs,
        metrics["seconds"],
    )
    clear_state(state_dir)
    return metrics


def load_finetuned(path, device="cpu") -> torch.nn.Module:
    """The fine-tuned model (eval mode) of a file written by :func:`finetune`, rebuilt from the file
    alone (architecture, input and class sizes, assignment, learned steps; no config or dataset) and
    loaded with ``weights_only``."""
    ckpt = torch_load(path, "fine-tuned model", "expected results/<model>/finetuned/.../<budget>.pt")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FINETUNED_FORMAT:
        raise ValueError(f"{path}: not a fine-tuned model written by mpqflow (format {FINETUNED_FORMAT!r})")
    state = ckpt["state_dict"]
    assignment = {l: tuple(o) for l, o in ckpt["assignment"].items()}
    act_signed = {l: bool(state[f"{l}.act_quant.quant_min"] < 0) for l, (_, a) in assignment.items() if a is not None}
    net = prepare_lsq(
        build_model(**ckpt["build"]),
        assignment,
        weight_init=None,
        per_channel=ckpt["per_channel"],
        act_signed=act_signed,
    )
    net.load_state_dict(state)
    return net.to(device).eval()
