"""Stage `evaluate`: held-out metrics of uniform assignments and of solved decisions.

Usage (what workflow_scripts/evaluate_uniform.py and evaluate_decisions.py call):
    evaluate_uniform(model_cfg, quant, seed, evaluation, runtime, model_pt, calibration_pt,
                     ["w8a8", "w4a8"], ["results/m/eval/uniform/w8a8.json", ...])
    evaluate_decisions(model_cfg, quant, plan, evaluation, runtime, model_pt, calibration_pt,
                       decision_jsons, eval_jsons)
    evaluate_finetuned(model_cfg, quant, seed, evaluation, runtime, model_pt, calibration_pt,
                       "results/m/finetuned/clado/set_4x0/avg_bits-2.5.pt", "results/m/finetuned/....json")

One job evaluates several assignments on one loaded context: loading torch, the model and the data
costs more than an evaluation of the default model, and each result is still its own file.
"""

from __future__ import annotations

import logging

from ..artifacts import decision_assignment, fp_metrics, load_decision
from ..config import EvaluationConfig, ModelConfig, QuantConfig, Runtime, SamplePlanConfig
from ..context import load_context
from ..data import set_indices
from ..evaluate import assignment_loss, evaluate_assignment, evaluate_lsq_model
from ..finetuned import load_finetuned, read_finetuned
from ..indicators import read_prune_masks
from ..io import save_json
from ..names import parse_option
from ..quant.prune import mask_weights, sparsity

__all__ = ["evaluate_uniform", "evaluate_decisions", "evaluate_finetuned"]
log = logging.getLogger("mpqflow")


def evaluate_uniform(
    model: ModelConfig,
    quant: QuantConfig,
    seed: int,
    evaluation: EvaluationConfig,
    runtime: Runtime,
    checkpoint: str,
    calibration: str,
    options: list[str],
    out_paths: list[str],
) -> list[dict]:
    """Evaluate every candidate layer at each option (fixed layers at their bits), next to the FP metrics."""
    ctx = load_context(model, quant, seed, runtime, checkpoint, calibration)
    fp = fp_metrics(checkpoint)
    results = []
    for option, out_path in zip(options, out_paths, strict=True):
        opt = parse_option(option)
        if opt not in ctx.table.options:
            raise ValueError(f"option {option!r} is not in the option table {list(ctx.table.options)}")
        metrics = evaluate_assignment(ctx, ctx.table.uniform_assignment(opt), evaluation.batch_size)
        metrics.update(method="uniform", option=option, fp_top1=fp["top1"], fp_loss=fp["loss"])
        log.info("uniform %s: top1 %.4f (FP %.4f)", option, metrics["top1"], fp["top1"])
        save_json(out_path, metrics)
        results.append(metrics)
    return results


def evaluate_decisions(
    model: ModelConfig,
    quant: QuantConfig,
    plan: SamplePlanConfig,
    evaluation: EvaluationConfig,
    runtime: Runtime,
    checkpoint: str,
    calibration: str,
    decision_paths: list[str],
    out_paths: list[str],
    masks: str | None = None,
) -> list[dict]:
    """Held-out metrics of each decision, and the loss increase it causes on its own sensitivity set.

    `masks`: a limpq set file whose LIMPQP pruning masks zero the FP weights first (its decisions are
    evaluated pruned; the loss increase is then against the pruned model with fixed layers only)."""
    ctx = load_context(model, quant, plan.seed, runtime, checkpoint, calibration)
    fp = fp_metrics(checkpoint)
    pruned = {}
    if masks is not None:
        layer_masks = read_prune_masks(masks)
        mask_weights(ctx.net, layer_masks)
        pruned = {"pruned_fraction": sparsity(layer_masks)}
        log.info("pruned with the masks of %s: %.1f %% of the masked weights", masks, 100 * pruned["pruned_fraction"])
    base_loss: dict = {}  # (n, s) -> loss of the base model (fixed layers only) on that set
    results = []
    for decision_path, out_path in zip(decision_paths, out_paths, strict=True):
        decision = load_decision(decision_path, ctx.table)
        assignment = decision_assignment(decision, ctx.table)
        metrics = evaluate_assignment(ctx, assignment, evaluation.batch_size)
        key = (decision["set_size"], decision["set_id"])
        idx = set_indices(len(ctx.train_set), plan, *key)
        if key not in base_loss:
            base_loss[key] = assignment_loss(ctx, ctx.table.fixed, idx, evaluation.batch_size)
        measured = assignment_loss(ctx, assignment, idx, evaluation.batch_size) - base_loss[key]
        metrics.update(
            method=decision["method"],
            budget=decision["budget"],
            set_size=decision["set_size"],
            set_id=decision["set_id"],
            choice=" ".join(decision["choice"]),
            fp_top1=fp["top1"],
            estimated_loss_increase=decision["estimated_loss_increase"],
            measured_loss_increase=measured,
            solver_status=decision["solver"]["status"],
            solver_gap=decision["solver"]["gap"],
            solver_seconds=decision["solver"]["seconds"],
            **pruned,
        )
        log.info(
            "%s %s: top1 %.4f, size %.4f MB, loss increase estimated %.4g measured %.4g",
            decision["method"],
            decision["budget"],
            metrics["top1"],
            metrics["size_mb"],
            metrics["estimated_loss_increase"],
            measured,
        )
        save_json(out_path, metrics)
        results.append(metrics)
    return results


def evaluate_finetuned(
    model: ModelConfig,
    quant: QuantConfig,
    seed: int,
    evaluation: EvaluationConfig,
    runtime: Runtime,
    checkpoint: str,
    calibration: str,
    finetuned: str,
    out_path: str,
) -> dict:
    """Held-out metrics of a fine-tuned model file (the eval/ schema, with its record: target, epochs,
    processes, distillation, train_seconds), measured on the model rebuilt from the file alone."""
    ctx = load_context(model, quant, seed, runtime, checkpoint, calibration)
    ckpt = read_finetuned(finetuned)
    if ckpt["checkpoint_sha256"] != ctx.checkpoint_sha256:
        raise ValueError(f"{finetuned}: fine-tuned from another FP checkpoint than {checkpoint}; rerun its fine-tuning")
    net = load_finetuned(ckpt, ctx.device)
    metrics = evaluate_lsq_model(net, ctx.table, ctx.test_set, evaluation.batch_size, ctx.device, ctx.workers)
    fp = fp_metrics(checkpoint)
    metrics.update(ckpt["record"], fp_top1=fp["top1"], fp_loss=fp["loss"])
    log.info("fine-tuned %s: top1 %.4f (FP %.4f)", finetuned, metrics["top1"], fp["top1"])
    save_json(out_path, metrics)
    return metrics
