"""Stage `solve`: form a method's objective from a pooled sensitivity set and solve it exactly per budget.

Usage (what workflow_scripts/check_budgets.py and solve_budget.py call):
    check_budgets("results/m/layers.json", ["avg_bits-3", "bitops_rel-0.25"], "results/m/budgets.json")
    solve_budget("results/m/layers.json", "results/m/sensitivity/clado/set_4x0.npz", "clado",
                 "avg_bits-4", solver_cfg, "results/m/decisions/clado/set_4x0/avg_bits-4.json")

No torch: the layer table comes from layers.json, the objective from numpy arrays.
"""

from __future__ import annotations

import logging

import numpy as np

from ..artifacts import load_batch_file, load_layer_table, save_decision, set_of
from ..config import SolverConfig
from ..io import save_json
from ..layers import LayerTable
from ..methods import estimated_loss_increase, method_objective
from ..names import option_name
from ..optimize import Budget, Problem, solve

__all__ = ["build_problem", "check_budgets", "solve_budget"]
log = logging.getLogger("mpqflow")


def build_problem(table: LayerTable, G=None, linear=None) -> Problem:
    """The integer program of an objective xᵀGx + linear·x over a layer table: one option per
    candidate layer, each option's size and BitOPs, the fixed layers' totals."""
    K = len(table.options)
    return Problem(
        G=G,
        linear=linear,
        layer_of=np.repeat(np.arange(len(table.candidates)), K),
        layer_names=list(table.candidates),
        options=[tuple(o) for o in table.options] * len(table.candidates),
        size_bits=np.array([table.numel[l] * w for l in table.candidates for w, _ in table.options], float),
        bitops=np.array([table.macs[l] * w * a for l in table.candidates for w, a in table.options], float),
        # unreached weights stay FP: 32 bits each, in every size and average-bits budget
        fixed_size_bits=float(
            sum(table.numel[l] * w for l, (w, _) in table.fixed.items()) + 32 * table.unreached_numel
        ),
        fixed_bitops=float(sum(table.macs[l] * w * a for l, (w, a) in table.fixed.items())),
        numel=np.array([table.numel[l] for l in table.candidates], float),
        fixed_numel=float(sum(table.numel[l] for l in table.fixed) + table.unreached_numel),
    )


def check_budgets(layers_path: str, budgets, out_path: str | None = None) -> dict:
    """Check every budget against the layer table before any solve; record each one's caps.

    Raises InfeasibleBudget naming the budget and the smallest achievable size or BitOPs. Runs as
    soon as the layer table exists, so a bad budget stops the run before the sensitivity stage ends.
    """
    table = load_layer_table(layers_path)
    problem = build_problem(table, linear=np.zeros(len(table.candidates) * len(table.options)))
    caps = {}
    for name in budgets:
        size_cap, bitops_cap = Budget.parse(name).to_caps(problem)
        caps[name] = {"size_cap_bits": size_cap, "bitops_cap": bitops_cap}
    if out_path is not None:
        save_json(out_path, caps)
    log.info("every budget is achievable: %s", ", ".join(budgets))
    return caps


def solve_budget(
    layers_path: str, pooled_path: str, method: str, budget: str, solver: SolverConfig, out_path: str
) -> dict:
    """Form the method's objective from the pooled set, solve exactly under the budget, write the decision."""
    table = load_layer_table(layers_path)
    G, linear = method_objective(method, load_batch_file(pooled_path), table)
    problem = build_problem(table, G, linear)
    sol = solve(
        problem,
        Budget.parse(budget),
        backend=solver.backend,
        time_limit=solver.time_limit,
        mip_gap=solver.mip_gap,
        node_limit=solver.node_limit,
    )
    n, s = set_of(pooled_path)
    decision = {
        "method": method,
        "budget": budget,
        "set_size": n,
        "set_id": s,
        "candidates": list(table.candidates),
        "choice": [option_name(problem.options[i]) for i in sol.choice],
        "estimated_loss_increase": float(estimated_loss_increase(method, (G, linear), sol.x)),
        "size_mb": problem.total_size_bits(sol.x) / 8e6,
        "avg_bits": problem.avg_bits(sol.x),
        "gbitops": problem.total_bitops(sol.x) / 1e9,
        "solver": sol.to_dict(),
    }
    log.info(
        "%s %s set_%dx%d: %s, objective %.6g, %s in %.2f s",
        method,
        budget,
        n,
        s,
        " ".join(decision["choice"]),
        sol.objective,
        sol.status,
        sol.seconds,
    )
    save_decision(out_path, decision)
    return decision
