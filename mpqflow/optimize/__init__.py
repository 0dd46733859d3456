"""The integer program of a mixed-precision search and its exact, time-limited solves.

Usage:
    from mpqflow.optimize import Problem, Budget, solve
    sol = solve(Problem(...), "avg_bits-3", backend="highs", time_limit=60, mip_gap=1e-4)
"""

from .budgets import BITS_PER_MB, KINDS, Budget, InfeasibleBudget, caps_of, parse_budgets
from .objectives import OBJECTIVES, diagonal, estimated_loss_increase, form_objective, psd_project, raw
from .problem import Problem
from .solve import BACKENDS, Solution, local_search, solve

__all__ = [
    "BACKENDS", "BITS_PER_MB", "KINDS", "OBJECTIVES", "Budget", "InfeasibleBudget", "Problem", "Solution",
    "caps_of", "diagonal", "estimated_loss_increase", "form_objective", "local_search", "parse_budgets",
    "psd_project", "raw", "solve",
]
