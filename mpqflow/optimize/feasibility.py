"""Whether a size cap and a BitOPs cap can be met together: exact, by two multiple-choice knapsacks.

Usage:
    check_jointly_feasible(problem, budgets, size_cap, bitops_cap)   # raises InfeasibleBudget if not

Each budget alone is checked against its own minimum (Budget.to_caps); two budgets can still
exclude each other (a size cap that forces low weight bits and a BitOPs cap that forces low
activation bits, when low weight bits come with high activation bits). The smallest BitOPs
under the size cap (and the smallest size under the BitOPs cap) is a MILP over the one-hot
constraints only, solved by HiGHS in milliseconds.
"""

from __future__ import annotations

from dataclasses import replace

from .backends import highs
from .budgets import BITS_PER_MB, UNITS, InfeasibleBudget, parse_budgets
from .problem import Problem

__all__ = ["check_jointly_feasible"]


def _least_under(problem: Problem, cost, fixed: float, size_cap, bitops_cap) -> tuple[float, float] | None:
    """(lower bound on, and value of) the smallest total `cost` within the other cap; None if HiGHS
    does not prove it (then nothing is claimed)."""
    scale = max(float(cost.max()), 1.0)  # an O(1) objective for HiGHS's absolute tolerances
    knapsack = replace(problem, G=None, linear=cost / scale)
    x, stop, bound = highs(knapsack, size_cap, bitops_cap, 10.0, 0.0, None, node_limit=None)
    if stop != "optimal" or x is None:
        return None
    return fixed + bound * scale, fixed + float(cost @ x)


def _budget_of(budgets, problem: Problem, size: bool, cap: float):
    """The budget that set this cap (the tightest of its kind)."""
    return next(b for b in budgets if b.is_size == size and b.to_caps(problem)[0 if size else 1] == cap)


def check_jointly_feasible(problem: Problem, budgets, size_cap, bitops_cap) -> None:
    """Raise InfeasibleBudget, naming the budgets and the smallest BitOPs within the size budget (and
    the smallest size within the BitOPs budget), if no decision meets both caps; else return.

    Args:
        budgets: what solve() got (a Budget, a string, a list); size_cap, bitops_cap: caps_of(budgets).
    """
    if size_cap is None or bitops_cap is None:
        return
    ops = _least_under(problem, problem.bitops, problem.fixed_bitops, size_cap, None)
    if ops is None or ops[0] <= bitops_cap * (1 + 1e-9):
        return
    budgets = parse_budgets(budgets)
    sb, ob = _budget_of(budgets, problem, True, size_cap), _budget_of(budgets, problem, False, bitops_cap)
    msg = (
        f"budgets {' + '.join(b.name for b in budgets)} are jointly infeasible: within {sb.name} the "
        f"smallest achievable BitOPs are {ob.in_unit(problem, ops[1]):.6g} {UNITS[ob.kind]} "
        f"({ops[1] / 1e9:.6g} GBitOPs), above {ob.name}"
    )
    size = _least_under(problem, problem.size_bits, problem.fixed_size_bits, None, bitops_cap)
    if size is not None:
        msg += (
            f"; within {ob.name} the smallest achievable size is {sb.in_unit(problem, size[1]):.6g} "
            f"{UNITS[sb.kind]} ({size[1] / BITS_PER_MB:.6g} MB)"
        )
    raise InfeasibleBudget(msg)
