"""The integer program of a mixed-precision search and its exact, time-limited solves.

Usage:
    from mpqflow.optimize import Problem, Budget, solve
    sol = solve(Problem(...), "avg_bits-3", backend="highs", time_limit=60, mip_gap=1e-4)

Modules: problem (the Problem), budgets (caps: size, BitOPs, latency), forms and qcr (the objective's forms), incumbent
(local search), backends (HiGHS, Gurobi, SCIP), feasibility (jointly infeasible budgets), solve
(the dispatcher).
"""

from .backends import BackendUnavailable
from .budgets import BITS_PER_MB, KINDS, Budget, Caps, InfeasibleBudget, NoLatencyTable, caps_of, parse_budgets
from .incumbent import local_search
from .problem import Problem, build_problem
from .solve import BACKENDS, Solution, solve

__all__ = [
    "BACKENDS",
    "BITS_PER_MB",
    "KINDS",
    "BackendUnavailable",
    "Budget",
    "Caps",
    "NoLatencyTable",
    "InfeasibleBudget",
    "Problem",
    "build_problem",
    "Solution",
    "caps_of",
    "local_search",
    "parse_budgets",
    "solve",
]
