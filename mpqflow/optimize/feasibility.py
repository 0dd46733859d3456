"""Whether several caps (size, BitOPs, latency) can be met together: exact, by multiple-choice knapsacks.

Usage:
    check_jointly_feasible(problem, budgets, size_cap, bitops_cap, latency_cap)   # InfeasibleBudget if not

Each budget alone is checked against its own minimum (Budget.to_caps); two budgets can still
exclude each other (a size cap that forces low weight bits and a BitOPs cap that forces low
activation bits, when low weight bits come with high activation bits). The smallest cost of each
capped kind under the other caps is a MILP over the one-hot constraints only, solved by HiGHS in
milliseconds; one above its own cap proves the caps exclude each other.
"""

from __future__ import annotations

from dataclasses import replace

from .backends import highs
from .budgets import BITS_PER_MB, UNITS, InfeasibleBudget, parse_budgets
from .problem import Problem

__all__ = ["check_jointly_feasible"]

_WHAT = ("size", "BitOPs", "latency")  # each cap's place, as the messages name it


def _least_under(problem: Problem, cost, fixed: float, caps) -> tuple[float, float] | None:
    """(lower bound on, and value of) the smallest total `cost` within `caps` (size, BitOPs, latency);
    None if HiGHS does not prove it (then nothing is claimed)."""
    scale = max(float(cost.max()), 1e-300)  # an O(1) objective for HiGHS's absolute tolerances
    knapsack = replace(problem, G=None, linear=cost / scale)
    x, stop, bound = highs(knapsack, *caps, 10.0, 0.0, None, node_limit=None)
    if stop != "optimal" or x is None:
        return None
    return fixed + bound * scale, fixed + float(cost @ x)


def _budget_of(budgets, problem: Problem, place: int, cap: float):
    """The budget that set this cap (the tightest of its kind)."""
    return next(b for b in budgets if b.cap_index == place and b.to_caps(problem)[place] == cap)


def _amount(budget, problem: Problem, total: float) -> str:
    """A total in the budget's unit, with the absolute figure."""
    absolute = (
        f"{total / BITS_PER_MB:.6g} MB"
        if budget.is_size
        else f"{total:.6g} ms"
        if budget.is_latency
        else f"{total / 1e9:.6g} GBitOPs"
    )
    return f"{budget.in_unit(problem, total):.6g} {UNITS[budget.kind]} ({absolute})"


def check_jointly_feasible(problem: Problem, budgets, size_cap, bitops_cap, latency_cap=None) -> None:
    """Raise InfeasibleBudget, naming the budgets, the smallest total of one capped kind within the
    other budgets and the budget it exceeds, if no decision meets every cap; else return.

    Args:
        budgets: what solve() got (a Budget, a string, a list); the caps: caps_of(budgets).
    """
    caps = (size_cap, bitops_cap, latency_cap)
    placed = [i for i, c in enumerate(caps) if c is not None]
    if len(placed) < 2:
        return
    rows = {0: (problem.size_bits, problem.fixed_size_bits), 1: (problem.bitops, problem.fixed_bitops)}
    if latency_cap is not None:
        rows[2] = (problem.latency_ms, problem.fixed_latency_ms)
    budgets = parse_budgets(budgets)
    for place in (1, 0, 2):  # BitOPs within the size cap first: the message of two-cap conflicts
        if place not in placed:
            continue
        others = tuple(c if i != place else None for i, c in enumerate(caps))
        least = _least_under(problem, *rows[place], others)
        if least is None or least[0] <= caps[place] * (1 + 1e-9):
            continue
        over = _budget_of(budgets, problem, place, caps[place])
        within = [_budget_of(budgets, problem, i, caps[i]) for i in placed if i != place]
        msg = (
            f"budgets {' + '.join(b.name for b in budgets)} are jointly infeasible: within "
            f"{' + '.join(b.name for b in within)} the smallest achievable {_WHAT[place]} "
            f"{'are' if place == 1 else 'is'} {_amount(over, problem, least[1])}, above {over.name}"
        )
        if len(placed) == 2:  # the converse, for the other kind
            other = within[0]
            back = _least_under(
                problem, *rows[other.cap_index], tuple(c if i == place else None for i, c in enumerate(caps))
            )
            if back is not None:
                msg += (
                    f"; within {over.name} the smallest achievable {_WHAT[other.cap_index]} "
                    f"{'are' if other.cap_index == 1 else 'is'} {_amount(other, problem, back[1])}"
                )
        raise InfeasibleBudget(msg)
