"""Feasible decisions without branch and bound: the incumbent every back-end starts from.

Usage:
    x0 = incumbent(problem, size_cap, bitops_cap, latency_cap)   # None if no start within the caps is found
    x = local_search(problem, x0, size_cap, bitops_cap, latency_cap)   # 1- and 2-swap descent within the caps
    choice = repair(problem, choice, size_cap, bitops_cap, latency_cap)   # greedy single-layer changes into them

The latency cap is optional in each (None: no latency budget), as is every cap.

Deterministic: the same problem and caps give the same decision. A solve stopped by its node or
time limit still returns a feasible decision because the back-ends start from this one.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .backends import highs
from .forms import cross_layer_quadratic
from .problem import Problem

__all__ = ["incumbent", "local_search", "repair", "single_moves"]


def single_moves(problem: Problem, G: np.ndarray | None, lin: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """(n,) d1[b]: the objective change when b's layer switches from its current option to b (0 for
    the current ones); G with zero within-layer blocks (cross_layer_quadratic), lin = problem.linear_terms()."""
    n, cur = problem.n, choice[problem.layer_of]  # cur: (n,) the current option of b's layer
    # Interaction of every option with the current choice: inter[b] = Σ_l G[b, choice_l].
    inter = np.zeros(n) if G is None else G[:, choice].sum(1)
    Gcur = np.zeros(n) if G is None else G[np.arange(n), cur]  # G[b, a_l(b)] (0: within-layer)
    return lin - lin[cur] + 2 * (inter - Gcur) - 2 * inter[cur]


def repair(problem: Problem, choice: np.ndarray, size_cap, bitops_cap, latency_cap=None) -> np.ndarray | None:
    """A choice within the caps reached from `choice` by single-layer changes, each the one that
    costs the least objective per unit of excess it removes (greedy); None if it gets stuck."""
    G, lin, lo = cross_layer_quadratic(problem), problem.linear_terms(), problem.layer_of
    caps = problem.cap_rows(size_cap, bitops_cap, latency_cap)
    choice = choice.copy()
    for _ in range(problem.n):
        cur = choice[lo]
        totals = [fixed + cost[choice].sum() for cost, fixed, _ in caps]
        over = sum(max(0.0, t - cap) / cap for t, (_, _, cap) in zip(totals, caps))  # relative overshoot
        if over <= 1e-9:
            return choice
        after = sum(np.maximum(0.0, t + cost - cost[cur] - cap) / cap for t, (cost, _, cap) in zip(totals, caps))
        removed = over - after  # (n,) overshoot each single move removes
        d1 = single_moves(problem, G, lin, choice)
        score = np.where(removed > 1e-12, d1 / np.maximum(removed, 1e-12), np.inf)  # objective per overshoot
        b = int(np.argmin(score))
        if not np.isfinite(score[b]):
            return None
        choice[lo[b]] = b
    return None


def local_search(
    problem: Problem, x0: np.ndarray, size_cap, bitops_cap, latency_cap=None, max_rounds: int = 1000
) -> np.ndarray:
    """Best-improvement descent within the caps: 1-swaps (one layer changes its option), then 2-swaps
    (two layers change together, which crosses the cap where no single move can); deterministic."""
    G, lin = cross_layer_quadratic(problem), problem.linear_terms()
    n, lo = problem.n, problem.layer_of
    choice = problem.choice_of(x0).copy()
    # every cap as (cost, running total, cap with the tolerance of is_feasible)
    caps = [
        (cost, fixed + float(cost[choice].sum()), cap * (1 + 1e-9))
        for cost, fixed, cap in problem.cap_rows(size_cap, bitops_cap, latency_cap)
    ]
    totals = [t for _, t, _ in caps]
    cross = lo[:, None] != lo[None, :]
    for _ in range(max_rounds):
        cur = choice[lo]  # (n,) the current option of each option's layer
        d1 = single_moves(problem, G, lin, choice)
        deltas = [cost - cost[cur] for cost, _, _ in caps]  # (n,) each cost's change of each single move
        ok1 = np.arange(n) != cur
        for d, total, (_, _, cap) in zip(deltas, totals, caps):
            ok1 &= total + d <= cap
        d = np.where(ok1, d1, np.inf)
        k = int(np.argmin(d))
        if d[k] < -1e-12 * max(1.0, abs(problem.objective(problem.x_of(choice)))):
            move = [(lo[k], k)]
        else:
            # Two layers l != m switching a -> b and c -> e: d1[b] + d1[e] + 2 (G[b,e] - G[b,c] - G[a,e] + G[a,c]).
            d2 = d1[:, None] + d1[None, :]
            if G is not None:
                Gbc = G[:, cur]  # (n, n): G[b, current of layer(e)]
                d2 += 2 * (G - Gbc - Gbc.T + G[np.ix_(cur, cur)])
            okp = np.arange(n) != cur
            ok2 = cross & okp[:, None] & okp[None, :]
            for d, total, (_, _, cap) in zip(deltas, totals, caps):
                ok2 &= total + d[:, None] + d[None, :] <= cap
            d2 = np.where(ok2, d2, np.inf)
            k2 = int(np.argmin(d2))
            if not d2.flat[k2] < -1e-12 * max(1.0, abs(problem.objective(problem.x_of(choice)))):
                break
            b, e = divmod(k2, n)
            move = [(lo[b], b), (lo[e], e)]
        for l, b in move:
            totals = [total + cost[b] - cost[choice[l]] for total, (cost, _, _) in zip(totals, caps)]
            choice[l] = b
    return problem.x_of(choice)


def incumbent(
    problem: Problem, size_cap, bitops_cap, latency_cap=None, kicks: int | None = None, seed: int = 0
) -> np.ndarray | None:
    """A good feasible decision, deterministic; None if no start is found.

    Local search from two starts, the cheapest choice and the optimum of the diagonal model
    (cross-layer terms dropped, exact multiple-choice knapsack), then iterated local search:
    `kicks` times (default 10 per layer) a seeded random change of three layers, repaired into
    the caps (a kick left outside them would be wasted), descended, kept if better.
    """
    caps = (size_cap, bitops_cap, latency_cap)
    x0 = problem.min_both(*caps)
    if x0 is None:  # several caps and no cheapest-by-one-cost choice meets the others: let the MIP find one
        return None
    best = local_search(problem, x0, *caps)
    if problem.is_linear:
        return best
    diagonal = replace(problem, G=None, linear=problem.linear_terms())
    x, _, _ = highs(diagonal, *caps, 10.0, 1e-9, x0, node_limit=10_000)  # milliseconds
    if x is not None and problem.is_feasible(x, *caps):
        x = local_search(problem, x, *caps)
        best = x if problem.objective(x) < problem.objective(best) else best
    best_obj, rng = problem.objective(best), np.random.default_rng(seed)
    for _ in range(10 * problem.L if kicks is None else kicks):
        choice = problem.choice_of(best)
        for l in rng.choice(problem.L, size=min(problem.L, 3), replace=False):
            choice[l] = rng.choice(problem.layers[l])
        choice = repair(problem, choice, *caps)
        if choice is None:
            continue
        x = local_search(problem, problem.x_of(choice), *caps)
        obj = problem.objective(x)
        if obj < best_obj - 1e-12 * max(1.0, abs(best_obj)):
            best, best_obj = x, obj
    return best
