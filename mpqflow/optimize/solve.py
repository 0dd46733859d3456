"""Exact solves of a Problem under budgets: HiGHS, Gurobi, SCIP, or `auto` (by the problem's structure);
node- and time-limited, never hanging.

Usage:
    sol = solve(problem, "avg_bits-3", backend="highs", time_limit=60, mip_gap=1e-4)
    sol.decision, sol.objective, sol.status, sol.gap, sol.to_dict()

Every back-end starts from a feasible incumbent (incumbent.py), so a solve stopped by its node or
time limit still returns a feasible decision, marked with the back-end's stop reason ("node_limit",
"time_limit", "gap_limit", ...) and its gap; "optimal" only where the back-end proved it (within
mip_gap). The node limit is the reproducible stop: the same problem stops at the same node on any
machine; the time limit is the guard against hangs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .backends import FUNCTIONS, BackendUnavailable
from .budgets import caps_of
from .feasibility import check_jointly_feasible
from .forms import is_psd
from .incumbent import incumbent
from .problem import Problem

__all__ = ["BACKENDS", "Solution", "solve", "auto_backends"]
log = logging.getLogger("mpqflow")
BACKENDS = ("auto", "highs", "gurobi", "scip")
_BACKENDS = dict(FUNCTIONS)  # name -> back-end function (tests replace entries)


@dataclass(frozen=True)
class Solution:
    """A decision and how it was found (objective = xᵀGx + linear·x, recomputed from x)."""

    x: np.ndarray
    choice: np.ndarray
    decision: dict
    objective: float
    bound: float
    gap: float
    status: str
    backend: str
    seconds: float

    def to_dict(self) -> dict:
        return {
            "x": [int(v) for v in self.x],
            "choice": [int(v) for v in self.choice],
            "decision": {k: list(v) for k, v in self.decision.items()},
            "objective": float(self.objective),
            "bound": float(self.bound),
            "gap": float(self.gap),
            "status": self.status,
            "backend": self.backend,
            "seconds": float(self.seconds),
        }


def _relative_gap(objective: float, bound: float) -> float:
    return max(0.0, objective - bound) / max(abs(objective), 1e-12)


def auto_backends(problem: Problem) -> list:
    """The back-ends `auto` tries, in order, for this problem's structure (bench/solver_bench.py,
    figures in bench/README.md):
    linear (diagonal methods) -> HiGHS (a multiple-choice knapsack MILP);
    PSD G (clado, clado_kl) -> Gurobi's convex MIQP, then SCIP's convex MINLP where Gurobi is
        missing or its pip licence refuses the size (HiGHS's linearization proves these slowest);
    indefinite G (clado_raw) -> Gurobi on the QCR form, then HiGHS on the tight linearization
        (SCIP's convex form of an indefinite G is the weakest).
    """
    if problem.is_linear:  # no G, or no cross-layer entries
        return ["highs"]
    return ["gurobi", "scip"] if is_psd(problem) else ["gurobi", "highs"]


def _run_chain(chain, problem, caps, time_limit, mip_gap, x0, node_limit):
    """(x, stop, bound, back-end) of the first back-end of `chain` that is available; only
    BackendUnavailable moves on to the next one, any other error propagates."""
    for i, backend in enumerate(chain):
        nodes = node_limit.get(backend) if isinstance(node_limit, dict) else node_limit
        try:
            x, stop, bound = _BACKENDS[backend](problem, *caps, time_limit, mip_gap, x0, nodes)
            return x, stop, bound, backend
        except BackendUnavailable as err:  # a missing package, or a licence that refuses the size
            if i == len(chain) - 1:
                raise
            log.info("solver %s unavailable (%s); trying %s", backend, err, chain[i + 1])


def solve(
    problem: Problem,
    budget=None,
    backend: str = "highs",
    time_limit: float = 60.0,
    mip_gap: float = 1e-4,
    node_limit: int | dict | None = None,
) -> Solution:
    """The exact optimum of the problem under the budget(s), or the best decision found in time_limit.

    Args:
        problem: the Problem.
        budget: None, a Budget, a "kind-value" string, or a list of them (all caps apply).
        backend: one of BACKENDS; "auto" picks by the problem's structure (auto_backends) and
            records the back-end it used.
        time_limit: seconds the back-end may run (the incumbent search comes on top, milliseconds).
        mip_gap: relative gap at which the back-end stops.
        node_limit: branch-and-bound nodes after which the back-end stops (None: no limit), or a
            {back-end: nodes} mapping, as a node costs very different work in each. Unlike the time
            limit it stops at the same point on any machine and under any load, so a solve that is
            not proven optimal still gives the same decision.

    Raises InfeasibleBudget below a budget's minimum (naming the smallest achievable size, BitOPs
    or latency) or for budgets that no decision meets together (check_jointly_feasible),
    NoLatencyTable for a latency budget on a problem without latencies, and BackendUnavailable when
    no back-end of the choice can run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown solver backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    t0 = time.perf_counter()
    caps = caps_of(budget, problem)
    x0 = incumbent(problem, *caps)
    if x0 is None:  # only with several caps set: are they jointly feasible at all?
        check_jointly_feasible(problem, budget, *caps)
    chain = auto_backends(problem) if backend == "auto" else [backend]
    x, stop, bound, backend = _run_chain(chain, problem, caps, time_limit, mip_gap, x0, node_limit)
    optimal = stop == "optimal"
    if x is None or not problem.is_feasible(x, *caps):
        if x0 is None:
            raise RuntimeError(f"{backend} found no decision within {time_limit} s ({stop}) and no incumbent exists")
        x, optimal = x0, False
        stop = stop if stop != "optimal" else "time_limit"
    elif x0 is not None and problem.objective(x0) < problem.objective(x):
        x = x0  # the warm start beat the back-end's decision (within its gap when it says optimal)
    objective = problem.objective(x)
    bound = min(bound, objective) if np.isfinite(bound) or not optimal else objective
    choice = problem.choice_of(x)
    return Solution(
        x=x,
        choice=choice,
        decision={problem.layer_names[l]: problem.options[i] for l, i in enumerate(choice)},
        objective=objective,
        bound=bound,
        gap=_relative_gap(objective, bound),
        status="optimal" if optimal else stop,
        backend=backend,
        seconds=time.perf_counter() - t0,
    )
