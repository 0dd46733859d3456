"""Stage `solve`: form a method's objective from a pooled sensitivity set and solve it exactly per budget.

Usage (what workflow_scripts/check_budgets.py and solve_budget.py call):
    check_budgets("results/m/layers.json", ["avg_bits-3", "bitops_rel-0.25"], "results/m/budgets.json")
    solve_budget("results/m/layers.json", "results/m/sensitivity/clado/set_4x0.npz", method,
                 "avg_bits-4", solver_cfg, "results/m/decisions/<method>/set_4x0/avg_bits-4.json",
                 method_settings(method, config))     # clado_na's {"k": ...}, limpq's {"alpha": ...}, else {}
    sanity_checks("results/m/layers.json", ["results/m/sensitivity/clado/set_4x0.npz", ...], "clado", solver_cfg,
                  "results/m/sanity/clado.json", {})   # no budget: highest precision everywhere?

`settings` is the method's own settings (:func:`mpqflow.methods.method_settings`: {} for most).
Each takes `latency_path=` (config key latency.table): the per-layer latency table that latency
budgets cap (:mod:`mpqflow.deploy.latency`); decisions then record their table latency.

No torch: the layer table comes from layers.json, the objective from numpy arrays.
"""

from __future__ import annotations

import logging

import numpy as np

from ..artifacts import (
    check_set_matches_table,
    load_batch_file,
    load_layer_table,
    refuse_nonfinite,
    save_decision,
    set_identity,
)
from ..config import SolverConfig
from ..deploy.latency import LatencyTableError, check_against_layers, read_latency_table
from ..io import save_json
from ..layers import LayerTable
from ..methods import estimated_loss_increase, method_allowed, method_objective, settings_of, settings_record
from ..names import option_name
from ..optimize import Budget, Problem, build_problem, solve
from ..optimize.budgets import same_caps

__all__ = ["check_budgets", "solve_budget", "sanity_check", "sanity_checks"]
log = logging.getLogger("mpqflow")


def _latency(latency_path: str | None, table: LayerTable, layers_path: str):
    """The latency table of config key latency.table checked against the layer table, or None."""
    if latency_path is None:
        return None
    try:
        latency = read_latency_table(latency_path)
        check_against_layers(latency, table)
    except LatencyTableError as err:
        raise LatencyTableError(f"config key 'latency.table': {err} (layer table {layers_path})") from None
    return latency


def check_budgets(layers_path: str, budgets, out_path: str | None = None, latency_path: str | None = None) -> dict:
    """Check every budget against the layer table before any solve; record each one's caps.

    Raises InfeasibleBudget naming the budget and the smallest achievable size or BitOPs. Runs as
    soon as the layer table exists, so a bad budget stops the run before the sensitivity stage ends.
    Each budget's record also lists, in `same_cap_as`, the budgets that resolve to the same cap on
    this model (:func:`mpqflow.optimize.budgets.same_caps`), logged as a warning: they are solved and
    evaluated to the same decisions. A layer table that is not whole or was edited since calibrate
    wrote it is refused before anything is written, and so is a latency table (`latency_path`) that
    does not fit it (a layer or option missing, a layer it does not have).
    """
    table = load_layer_table(layers_path)
    latency = _latency(latency_path, table, layers_path)
    problem = build_problem(table, linear=np.zeros(len(table.candidates) * len(table.options)), latency=latency)
    resolved = {name: Budget.parse(name).to_caps(problem) for name in budgets}
    shared = same_caps(resolved)
    caps = {
        name: {
            "size_cap_bits": c.size_bits,
            "bitops_cap": c.bitops,
            **({} if latency is None else {"latency_cap_ms": c.latency_ms}),
            "same_cap_as": shared[name],
        }
        for name, c in resolved.items()
    }
    for i, name in enumerate(budgets):
        later = [other for other in shared[name] if list(budgets).index(other) > i]
        if later:
            place, cap = next((i, c) for i, c in enumerate(resolved[name]) if c is not None)
            log.warning(
                "budget %s has the same cap as %s on this model (%s %s): each is solved and evaluated to "
                "the same decisions; keep one of them in `budgets` to save those jobs",
                name,
                ", ".join(later),
                f"{cap:.6g}" if place == 2 else f"{cap:.0f}",  # whole bits and BitOPs, fractional ms
                ("weight bits", "BitOPs", "ms by the latency table")[place],
            )
    if out_path is not None:
        save_json(out_path, caps)
    log.info("every budget is achievable: %s", ", ".join(budgets))
    return caps


def _method_problem(
    layers_path: str, pooled_path: str, method: str, settings, latency_path: str | None = None
) -> tuple[LayerTable, Problem, np.ndarray | None, tuple[int, int]]:
    """The layer table, the method's integer program over the pooled set, the options it allows (None:
    all) and the set's (size, id) as its file records them. The table must be whole and unedited,
    calibrated from the checkpoint the set was computed on, and the set made with its candidates and
    options; a latency table (`latency_path`) gives every option its latency."""
    pooled = load_batch_file(pooled_path)
    table = load_layer_table(layers_path, checkpoint_sha256=str(pooled["checkpoint_sha256"]), against=pooled_path)
    check_set_matches_table(pooled, pooled_path, table, layers_path)
    G, linear = method_objective(method, pooled, table, settings)
    # a set file written before the estimators refused non-finite entries, or a method's arithmetic
    what = f"{method}'s objective on {pooled_path} (remove the file and its batch files and rerun them)"
    refuse_nonfinite({"G": G, "linear": linear}, table.candidates, len(table.options), what)
    allowed = method_allowed(method, pooled, table)  # None, or LIMPQ's outlier rule
    latency = _latency(latency_path, table, layers_path)
    problem = build_problem(table, G, linear, allowed, latency=latency)
    return table, problem, allowed, set_identity(pooled, pooled_path)


def _solve(problem: Problem, budget, solver: SolverConfig):
    return solve(
        problem,
        budget,
        backend=solver.backend,
        time_limit=solver.time_limit,
        mip_gap=solver.mip_gap,
        node_limit=solver.node_limit,
    )


def solve_budget(
    layers_path: str,
    pooled_path: str,
    method: str,
    budget: str,
    solver: SolverConfig,
    out_path: str,
    settings: dict,
    latency_path: str | None = None,
) -> dict:
    """Form the method's objective from the pooled set, solve exactly under the budget, write the decision.

    `settings`: the method's own settings (clado_na's k, limpq's alpha; {} for the others), recorded in
    the decision. `latency_path`: the latency table (latency.table); the decision then records its
    `latency_ms`, the table's sum."""
    own = settings_of(method, settings)
    table, problem, allowed, (n, s) = _method_problem(layers_path, pooled_path, method, own, latency_path)
    sol = _solve(problem, Budget.parse(budget), solver)
    decision = {
        "method": method,
        "budget": budget,
        "set_size": n,
        "set_id": s,
        "candidates": list(table.candidates),
        "choice": [option_name(problem.options[i]) for i in sol.choice],
        "estimated_loss_increase": float(estimated_loss_increase(method, (problem.G, problem.linear), sol.x)),
        "size_mb": problem.total_size_bits(sol.x) / 8e6,
        "avg_bits": problem.avg_bits(sol.x),
        "gbitops": problem.total_bitops(sol.x) / 1e9,
        "solver": sol.to_dict(),
    }
    if problem.latency_ms is not None:
        decision["latency_ms"] = problem.total_latency_ms(sol.x)
    decision.update(settings_record(own))
    if allowed is not None:  # what the method ruled out, so a surprising choice can be traced
        K = len(table.options)
        decision["forbidden"] = [
            f"{table.candidates[i // K]}:{option_name(table.options[i % K])}" for i in np.flatnonzero(~allowed)
        ]
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


def sanity_check(
    layers_path: str,
    pooled_path: str,
    method: str,
    solver: SolverConfig,
    settings: dict,
    out_path: str | None = None,
    latency_path: str | None = None,
) -> dict:
    """The seed's sanity check as a result: solve once with no budget; an estimate worth trusting
    picks the highest-precision option (largest w_bits, then a_bits) at every candidate layer.
    With a latency table (`latency_path`) the result records the choice's `latency_ms`.

    Writes {method, set_size, set_id, highest, layers, layers_at_highest, passes, choice,
    estimated_loss_increase (at the unconstrained optimum), estimated_at_highest (of all layers at
    the highest option; null where the method forbids it somewhere), solver}."""
    table, problem, _, (n, s) = _method_problem(layers_path, pooled_path, method, settings, latency_path)
    sol = _solve(problem, None, solver)
    highest = max(tuple(o) for o in table.options)
    at_highest = np.array([tuple(o) == highest for o in problem.options], dtype=np.float64)  # (n_allowed,)
    reachable = len(set(problem.layer_of[at_highest > 0])) == len(table.candidates)
    objective = (problem.G, problem.linear)
    chosen = [tuple(problem.options[i]) for i in sol.choice]
    result = {
        "method": method,
        "set_size": n,
        "set_id": s,
        "highest": option_name(highest),
        "layers": len(table.candidates),
        "layers_at_highest": sum(o == highest for o in chosen),
        "passes": all(o == highest for o in chosen),
        "choice": [option_name(o) for o in chosen],
        "estimated_loss_increase": float(estimated_loss_increase(method, objective, sol.x)),
        "estimated_at_highest": float(estimated_loss_increase(method, objective, at_highest)) if reachable else None,
        "solver": sol.to_dict(),
    }
    if problem.latency_ms is not None:
        result["latency_ms"] = problem.total_latency_ms(sol.x)
    log.info(
        "%s set_%dx%d with no budget: %d of %d layers at %s (%s), estimate %.4g (%s at %s everywhere)",
        method,
        n,
        s,
        result["layers_at_highest"],
        result["layers"],
        result["highest"],
        "passes" if result["passes"] else "FAILS the sanity check",
        result["estimated_loss_increase"],
        result["estimated_at_highest"],
        result["highest"],
    )
    if out_path is not None:
        save_json(out_path, result)
    return result


def sanity_checks(
    layers_path: str,
    pooled_paths: list[str],
    method: str,
    solver: SolverConfig,
    out_path: str,
    settings: dict,
    latency_path: str | None = None,
) -> list[dict]:
    """:func:`sanity_check` of one method on each set, written as one JSON list (what the workflow runs)."""
    results = [sanity_check(layers_path, p, method, solver, settings, latency_path=latency_path) for p in pooled_paths]
    save_json(out_path, results)
    return results
