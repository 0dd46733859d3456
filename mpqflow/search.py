"""The MPQ search stages after the sensitivities: one exact solve per budget, evaluation of each decision.

Usage (what the workflow scripts call):
    solve_budget(calibration_pt, set_npz, "clado", "avg_bits-4", {"backend": "highs", ...}, decision_json)
    evaluate_decision(cfg, "m", model_pt, calibration_pt, decision_json, eval_json)
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import torch
import torch.nn.functional as F

from .config import option_name
from .data import sensitivity_set
from .evaluate import evaluate
from .io import load_json, save_json
from .methods import estimated_loss_increase, method_estimator, method_objective
from .optimize import Budget, Problem, solve
from .pipeline import Context, LayerTable, evaluate_assignment, load_context
from .sensitivity import load_batch_file
from .sensitivity.jobs import pool_batch_indices

__all__ = [
    "build_problem",
    "solve_budget",
    "set_indices",
    "evaluate_decision",
]
log = logging.getLogger("mpqflow")
SET_RE = re.compile(r"set_(\d+)x(\d+)")


def _table(calibration: str) -> LayerTable:
    t = torch.load(calibration, map_location="cpu", weights_only=False)["table"]
    return LayerTable(tuple(t["layers"]), tuple(t["candidates"]), {k: tuple(v) for k, v in t["fixed"].items()},
                      tuple(tuple(o) for o in t["options"]), t["numel"], t["macs"])


def build_problem(table: LayerTable, G: np.ndarray | None, linear: np.ndarray | None) -> Problem:
    """The integer program of a method's objective: one option per candidate layer, costs per option."""
    K = len(table.options)
    size_bits = np.array([table.numel[l] * w for l in table.candidates for w, _ in table.options], float)
    bitops = np.array([table.macs[l] * w * a for l in table.candidates for w, a in table.options], float)
    return Problem(
        G=G,
        linear=linear,
        layer_of=np.repeat(np.arange(len(table.candidates)), K),
        layer_names=list(table.candidates),
        options=[tuple(o) for o in table.options] * len(table.candidates),
        size_bits=size_bits,
        bitops=bitops,
        fixed_size_bits=float(sum(table.numel[l] * w for l, (w, _) in table.fixed.items())),
        fixed_bitops=float(sum(table.macs[l] * w * a for l, (w, a) in table.fixed.items())),
        numel=np.array([table.numel[l] for l in table.candidates], float),
        fixed_numel=float(sum(table.numel[l] for l in table.fixed)),
    )


def solve_budget(calibration, pooled_path, method, budget, solver: dict, out_path) -> dict:
    """Form the method's objective from the pooled set, solve exactly under the budget, write the decision."""
    table = _table(calibration)
    pooled = load_batch_file(pooled_path)
    G, linear = method_objective(method, pooled, table)
    problem = build_problem(table, G, linear)
    sol = solve(problem, Budget.parse(budget), backend=solver["backend"], time_limit=solver["time_limit"],
                mip_gap=solver["mip_gap"], node_limit=solver["node_limit"])
    choice = [problem.options[i] for i in sol.choice]
    n, s = map(int, SET_RE.search(pooled_path).groups())
    decision = {
        "method": method,
        "budget": budget,
        "set_size": n,
        "set_id": s,
        "candidates": list(table.candidates),
        "choice": [option_name(o) for o in choice],
        "estimated_loss_increase": float(estimated_loss_increase(method, (G, linear), sol.x)),
        "size_mb": problem.total_size_bits(sol.x) / 8e6,
        "avg_bits": problem.avg_bits(sol.x),
        "gbitops": problem.total_bitops(sol.x) / 1e9,
        "solver": sol.to_dict(),
    }
    log.info("%s %s set_%dx%d: %s, objective %.6g, %s in %.2f s", method, budget, n, s,
             " ".join(decision["choice"]), sol.objective, sol.status, sol.seconds)
    save_json(out_path, decision)
    return decision


def set_indices(cfg: dict, n_train: int, n: int, s: int) -> np.ndarray:
    """Training-split indices of every sample in sensitivity set `set_{n}x{s}`."""
    batches = sensitivity_set(n, s, cfg["sensitivity"]["pool_batches"], cfg["seed"])
    return np.concatenate([pool_batch_indices(cfg, n_train, b) for b in batches])


@torch.no_grad()
def _set_loss(ctx: Context, assignment: dict, idx: np.ndarray) -> float:
    """Mean cross-entropy over the set's samples with `assignment` applied."""
    with ctx.quantizer.applied(assignment):
        return evaluate(ctx.net, ctx.train_set, ctx.cfg["evaluation"]["batch_size"], ctx.device, idx)["loss"]


def evaluate_decision(cfg, model, checkpoint, calibration, decision_path, out_path) -> dict:
    """Held-out metrics of a decision, and the loss increase it causes on its own sensitivity set."""
    ctx = load_context(cfg, model, checkpoint, calibration)
    decision = load_json(decision_path)
    if decision["candidates"] != list(ctx.table.candidates):
        raise ValueError(f"{decision_path}: candidate layers differ from the calibration's layer table")
    options = [tuple(map(int, o[1:].split("a"))) for o in decision["choice"]]
    assignment = ctx.full_assignment(dict(zip(ctx.table.candidates, options)))
    metrics = evaluate_assignment(ctx, assignment)
    idx = set_indices(cfg, len(ctx.train_set), decision["set_size"], decision["set_id"])
    measured = _set_loss(ctx, assignment, idx) - _set_loss(ctx, ctx.table.fixed, idx)
    fp = torch.load(checkpoint, map_location="cpu", weights_only=False)["fp_metrics"]
    metrics.update(
        method=decision["method"], budget=decision["budget"], set_size=decision["set_size"],
        set_id=decision["set_id"], choice=" ".join(decision["choice"]), fp_top1=fp["top1"],
        estimated_loss_increase=decision["estimated_loss_increase"], measured_loss_increase=measured,
        solver_status=decision["solver"]["status"], solver_gap=decision["solver"]["gap"],
        solver_seconds=decision["solver"]["seconds"],
    )
    log.info("%s %s: top1 %.4f, size %.4f MB, loss increase estimated %.4g measured %.4g", decision["method"],
             decision["budget"], metrics["top1"], metrics["size_mb"], metrics["estimated_loss_increase"], measured)
    save_json(out_path, metrics)
    return metrics
