"""Exact solves of a Problem under budgets: HiGHS, Gurobi, SCIP, or `auto` (by the problem's structure);
node- and time-limited, never hanging.

Usage:
    sol = solve(problem, "avg_bits-3", backend="highs", time_limit=60, mip_gap=1e-4)
    sol.decision, sol.objective, sol.status ("optimal" | "node_limit" | "time_limit"), sol.gap, sol.to_dict()

Every back-end starts from a feasible incumbent (local search with 1- and 2-swaps from the cheapest
choice and from the diagonal model's optimum, then seeded kicks repaired into the caps), so a solve
stopped by its node or time limit still returns a feasible decision, marked node_limit or
time_limit with its gap. The node limit is the reproducible stop: the same problem stops at the
same node on any machine; the time limit is the guard against hangs.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from .budgets import caps_of
from .problem import Problem
from .qcr import min_eigenvalue, qcr_form, shift_to_psd

__all__ = ["BACKENDS", "Solution", "solve", "local_search", "auto_backends"]
log = logging.getLogger("mpqflow")
BACKENDS = ("auto", "highs", "gurobi", "scip")


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


@functools.lru_cache(maxsize=8)
def _quadratic(problem: Problem) -> np.ndarray | None:
    """G with the within-layer blocks zeroed (they never contribute on one-hot x); None if linear.

    Cached (read-only) per problem: the incumbent search asks for it on every kick; copying G each
    time made up about a fifth of that search (measured on the synthetic 54 x 6: 2.0 s, 1.6 s now)."""
    if problem.is_linear:
        return None
    G = np.array(problem.G)
    same = problem.layer_of[:, None] == problem.layer_of[None, :]
    G[same] = 0.0
    G.setflags(write=False)
    return G


def _is_psd(problem: Problem) -> bool:
    """True if G is positive semidefinite up to rounding (a PSD-projected method's G)."""
    lam_min, tol = min_eigenvalue(problem.G)
    return lam_min >= -tol


def _convex_form(problem: Problem) -> tuple[np.ndarray | None, np.ndarray]:
    """(Q, c) with xᵀQx + c·x = xᵀGx + linear·x on every binary x and Q ⪰ 0: Q = G + λI, c = linear − λ.

    G is taken whole: its within-layer entries vanish on one-hot x, but they are what makes a
    PSD-projected G positive semidefinite, so that method's problem is a convex MIQP as given
    (λ = 0). Zeroing them (as the linearization may) would leave an indefinite matrix. A raw,
    indefinite G gets the smallest shift λ = −λ_min(G) (shift_to_psd). None for Q if the problem
    is linear.
    """
    c = np.zeros(problem.n) if problem.linear is None else problem.linear.astype(float).copy()
    if problem.G is None:
        return None, c
    return shift_to_psd(problem.G, c)


def _qcr_if_indefinite(problem: Problem, size_cap, bitops_cap) -> tuple[np.ndarray, np.ndarray] | None:
    """The QCR form (qcr.py) of an indefinite G; None for a linear or PSD problem, or if SCS fails.
    A PSD G is left as it is: measured on the 54 x 3 PSD instances, the SDP cost more than it saved."""
    if problem.is_linear or _is_psd(problem):
        return None
    return qcr_form(problem, size_cap, bitops_cap)


def _single_moves(problem: Problem, G: np.ndarray | None, lin: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """(n,) d1[b]: the objective change when b's layer switches from its current option to b (0 for
    the current ones); G with zero within-layer blocks (_quadratic), lin = problem.linear_terms()."""
    n, cur = problem.n, choice[problem.layer_of]             # cur: (n,) the current option of b's layer
    # Interaction of every option with the current choice: inter[b] = Σ_l G[b, choice_l].
    inter = np.zeros(n) if G is None else G[:, choice].sum(1)
    Gcur = np.zeros(n) if G is None else G[np.arange(n), cur]   # G[b, a_l(b)] (0: within-layer)
    return lin - lin[cur] + 2 * (inter - Gcur) - 2 * inter[cur]


def _repair(problem: Problem, choice: np.ndarray, size_cap, bitops_cap) -> np.ndarray | None:
    """A choice within the caps reached from `choice` by single-layer changes, each the one that
    costs the least objective per unit of excess it removes (greedy); None if it gets stuck."""
    G, lin, lo = _quadratic(problem), problem.linear_terms(), problem.layer_of
    caps = [(cost, fixed, cap) for cost, fixed, cap in ((problem.size_bits, problem.fixed_size_bits, size_cap),
                                                        (problem.bitops, problem.fixed_bitops, bitops_cap))
            if cap is not None]
    choice = choice.copy()
    for _ in range(problem.n):
        cur = choice[lo]
        totals = [fixed + cost[choice].sum() for cost, fixed, _ in caps]
        over = sum(max(0.0, t - cap) / cap for t, (_, _, cap) in zip(totals, caps))  # relative overshoot
        if over <= 1e-9:
            return choice
        after = sum(np.maximum(0.0, t + cost - cost[cur] - cap) / cap for t, (cost, _, cap) in zip(totals, caps))
        removed = over - after                                 # (n,) overshoot each single move removes
        d1 = _single_moves(problem, G, lin, choice)
        score = np.where(removed > 1e-12, d1 / np.maximum(removed, 1e-12), np.inf)  # objective per overshoot
        b = int(np.argmin(score))
        if not np.isfinite(score[b]):
            return None
        choice[lo[b]] = b
    return None


def local_search(problem: Problem, x0: np.ndarray, size_cap, bitops_cap, max_rounds: int = 1000) -> np.ndarray:
    """Best-improvement descent within the caps: 1-swaps (one layer changes its option), then 2-swaps
    (two layers change together, which crosses the cap where no single move can); deterministic."""
    G, lin = _quadratic(problem), problem.linear_terms()
    n, lo = problem.n, problem.layer_of
    choice = problem.choice_of(x0).copy()
    size, ops = problem.total_size_bits(x0), problem.total_bitops(x0)
    size_cap = np.inf if size_cap is None else size_cap * (1 + 1e-9)
    bitops_cap = np.inf if bitops_cap is None else bitops_cap * (1 + 1e-9)
    cross = lo[:, None] != lo[None, :]
    for _ in range(max_rounds):
        cur = choice[lo]                                      # (n,) the current option of each option's layer
        d1 = _single_moves(problem, G, lin, choice)
        ds, do = problem.size_bits - problem.size_bits[cur], problem.bitops - problem.bitops[cur]
        ok1 = (size + ds <= size_cap) & (ops + do <= bitops_cap) & (np.arange(n) != cur)
        d = np.where(ok1, d1, np.inf)
        k = int(np.argmin(d))
        if d[k] < -1e-12 * max(1.0, abs(problem.objective(problem.x_of(choice)))):
            move = [(lo[k], k)]
        else:
            # Two layers l != m switching a -> b and c -> e: d1[b] + d1[e] + 2 (G[b,e] - G[b,c] - G[a,e] + G[a,c]).
            d2 = d1[:, None] + d1[None, :]
            if G is not None:
                Gbc = G[:, cur]                                  # (n, n): G[b, current of layer(e)]
                d2 += 2 * (G - Gbc - Gbc.T + G[np.ix_(cur, cur)])
            okp = (np.arange(n) != cur)
            ok2 = cross & okp[:, None] & okp[None, :] & \
                (size + ds[:, None] + ds[None, :] <= size_cap) & (ops + do[:, None] + do[None, :] <= bitops_cap)
            d2 = np.where(ok2, d2, np.inf)
            k2 = int(np.argmin(d2))
            if not d2.flat[k2] < -1e-12 * max(1.0, abs(problem.objective(problem.x_of(choice)))):
                break
            b, e = divmod(k2, n)
            move = [(lo[b], b), (lo[e], e)]
        for l, b in move:
            size += problem.size_bits[b] - problem.size_bits[choice[l]]
            ops += problem.bitops[b] - problem.bitops[choice[l]]
            choice[l] = b
    return problem.x_of(choice)


def _incumbent(problem: Problem, size_cap, bitops_cap, kicks: int | None = None, seed: int = 0) -> np.ndarray | None:
    """A good feasible decision, deterministic; None if no start is found.

    Local search from two starts, the cheapest choice and the optimum of the diagonal model
    (cross-layer terms dropped, exact multiple-choice knapsack), then iterated local search:
    `kicks` times (default 10 per layer) a seeded random change of three layers, repaired into
    the caps, descended, kept if better. Measured against the former 60 kicks from the cheapest
    start without repair (a kick that left the caps was wasted): on the default model's ten CLADO
    problems (bench/solver_bench.py) this reaches all ten proven optima, the former seven; on its
    eight synthetic 54-layer problems at 4 and 5 bits the former ended 0.5-82 % worse on six and
    better on none.
    """
    x0 = problem.min_both(size_cap, bitops_cap)
    if x0 is None:  # both caps set and no cheapest-by-one-cost choice meets the other: let the MIP find one
        return None
    best = local_search(problem, x0, size_cap, bitops_cap)
    if problem.is_linear:
        return best
    diagonal = replace(problem, G=None, linear=problem.linear_terms())
    x, _, _ = _highs(diagonal, size_cap, bitops_cap, 10.0, 1e-9, x0, node_limit=10_000)  # milliseconds
    if x is not None and problem.is_feasible(x, size_cap, bitops_cap):
        x = local_search(problem, x, size_cap, bitops_cap)
        best = x if problem.objective(x) < problem.objective(best) else best
    best_obj, rng = problem.objective(best), np.random.default_rng(seed)
    for _ in range(10 * problem.L if kicks is None else kicks):
        choice = problem.choice_of(best)
        for l in rng.choice(problem.L, size=min(problem.L, 3), replace=False):
            choice[l] = rng.choice(problem.layers[l])
        choice = _repair(problem, choice, size_cap, bitops_cap)
        if choice is None:
            continue
        x = local_search(problem, problem.x_of(choice), size_cap, bitops_cap)
        obj = problem.objective(x)
        if obj < best_obj - 1e-12 * max(1.0, abs(best_obj)):
            best, best_obj = x, obj
    return best


def _silent_highs():
    """A highspy.Highs without the banner its constructor writes to file descriptor 1 before any
    option can turn output off (it went into every solve job's stdout, not the rule's log)."""
    import highspy

    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


# ---- HiGHS: the tight linearization ---------------------------------------------------------------
def _highs(problem: Problem, size_cap, bitops_cap, time_limit, mip_gap, x0, node_limit=None):
    """min Σ_a c_a x_a + Σ_{a<c cross-layer} 2 G_ac y_ac, with Σ_{c∈m} y_ac = x_a for every a and layer m ≠ l(a).

    With x binary these equalities force y_ac = x_a x_c, so y stays continuous in [0, 1].
    """
    import highspy
    import scipy.sparse as sp

    n, lin, G = problem.n, problem.linear_terms(), _quadratic(problem)
    pairs = np.zeros((0, 2), np.int64) if G is None else np.argwhere(
        np.triu(problem.layer_of[:, None] != problem.layer_of[None, :], 1))  # (P, 2), a < c
    P = len(pairs)
    cost = np.concatenate([lin, 2 * G[pairs[:, 0], pairs[:, 1]] if P else []])
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add_row(c, v, lower, upper):
        rows.append(np.full(len(c), len(lo)))
        cols.append(np.asarray(c))
        vals.append(np.asarray(v, float))
        lo.append(lower)
        hi.append(upper)

    for ix in problem.layers:  # one option per layer
        add_row(ix, np.ones(len(ix)), 1.0, 1.0)
    if size_cap is not None:
        add_row(np.arange(n), problem.size_bits, -np.inf, size_cap - problem.fixed_size_bits)
    if bitops_cap is not None:
        add_row(np.arange(n), problem.bitops, -np.inf, bitops_cap - problem.fixed_bitops)
    if P:
        # Row (a, m): Σ_{c∈m} y_{ac} − x_a = 0; each y_ac sits in row (a, l(c)) and row (c, l(a)).
        L = problem.L
        row_of = lambda a, m: len(lo) + a * L + m  # noqa: E731
        y = n + np.arange(P)
        a, c = pairs[:, 0], pairs[:, 1]
        la, lc = problem.layer_of[a], problem.layer_of[c]
        eq_rows = np.concatenate([row_of(a, lc), row_of(c, la)])
        rows.append(eq_rows)
        cols.append(np.concatenate([y, y]))
        vals.append(np.ones(2 * P))
        xa = np.repeat(np.arange(n), L)
        m = np.tile(np.arange(L), n)
        keep = problem.layer_of[xa] != m
        rows.append(row_of(xa[keep], m[keep]))
        cols.append(xa[keep])
        vals.append(-np.ones(int(keep.sum())))
        lo.extend([0.0] * (n * L))
        hi.extend([0.0] * (n * L))
        # Rows (a, l(a)) are empty: pin them to 0 = 0 (harmless, keeps the indexing simple).
    A = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(len(lo), n + P))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n + P, len(lo)
    lp.col_cost_ = cost
    lp.col_lower_ = np.zeros(n + P)
    lp.col_upper_ = np.ones(n + P)
    lp.row_lower_, lp.row_upper_ = np.array(lo, float), np.array(hi, float)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n + [highspy.HighsVarType.kContinuous] * P
    h = _silent_highs()
    for k, v in (("output_flag", False), ("time_limit", float(time_limit)), ("mip_rel_gap", float(mip_gap)),
                 ("random_seed", 0), ("threads", 1), ("presolve", "on")):
        h.setOptionValue(k, v)
    if node_limit is not None:
        h.setOptionValue("mip_max_nodes", int(node_limit))
    h.passModel(lp)
    if x0 is not None:
        start = highspy.HighsSolution()
        yv = x0[pairs[:, 0]] * x0[pairs[:, 1]] if P else np.zeros(0)
        start.col_value = list(np.concatenate([x0, yv]).astype(float))
        start.value_valid = True
        h.setSolution(start)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    x = None
    if info.primal_solution_status == 2:  # feasible
        x = (np.asarray(h.getSolution().col_value[:n]) > 0.5).astype(np.int64)
    # mip_max_nodes ends a run as kSolutionLimit; anything else short of optimal counts as the time limit.
    stop = "optimal" if status == highspy.HighsModelStatus.kOptimal else \
        "node_limit" if status == highspy.HighsModelStatus.kSolutionLimit else "time_limit"
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else -np.inf
    return x, stop, bound


# ---- Gurobi: the binary QP natively ---------------------------------------------------------------
def _gurobi_refuses(n: int) -> str | None:
    """Gurobi's error for a binary QP with n variables (its pip licence's size limit), else None;
    milliseconds, on an almost empty model."""
    import gurobipy as gp

    try:
        m = gp.Model(env=gp.Env(params={"OutputFlag": 0}))
        x = m.addMVar(n, vtype=gp.GRB.BINARY)
        m.setObjective(x[0] * x[-1])
        m.Params.TimeLimit = 0.0
        m.optimize()
    except gp.GurobiError as err:
        return str(err)
    return None


def _gurobi(problem: Problem, size_cap, bitops_cap, time_limit, mip_gap, x0, node_limit=None):
    """Gurobi's convex MIQP branch and bound. An indefinite G (clado_raw) goes in as its QCR form
    (qcr.py): exact on every decision, PSD, and as strong at the root as the SDP bound; measured
    (bench/solver_bench.py), it proves the default model's raw problems in 1.5-2.3 s (HiGHS 6-13 s)
    and the synthetic 54 x 3 raw ones in 14-32 s (HiGHS and Gurobi's own nonconvex MIQP: not in
    60 s). A PSD G goes in as it is (_convex_form): there the SDP costs more than it saves
    (54 x 3 PSD: 6.0-9.4 s with QCR, 0.6-8.7 s without). Should SCS fail, an indefinite G falls
    back to Gurobi's native nonconvex binary QP (the diagonal shift's relaxation is too weak: a gap
    near 1 after 30 s)."""
    import gurobipy as gp

    refusal = _gurobi_refuses(problem.n)
    if refusal:  # before the QCR's SDP spends seconds on a model the licence will refuse
        raise RuntimeError(f"gurobi cannot solve this problem ({problem.n} binaries): {refusal}; "
                           "the pip licence is size-limited, use solver.backend: auto, highs or scip")
    form = _qcr_if_indefinite(problem, size_cap, bitops_cap)
    if form is not None:
        Q, lin = form
    elif not problem.is_linear and not _is_psd(problem):  # SCS failed
        Q, lin = _quadratic(problem), problem.linear_terms()
    else:
        Q, lin = _convex_form(problem)
    try:
        env = gp.Env(params={"OutputFlag": 0})
        m = gp.Model(env=env)
        x = m.addMVar(problem.n, vtype=gp.GRB.BINARY)
        for ix in problem.layers:
            m.addConstr(x[ix].sum() == 1)
        if size_cap is not None:
            m.addConstr(problem.size_bits @ x <= size_cap - problem.fixed_size_bits)
        if bitops_cap is not None:
            m.addConstr(problem.bitops @ x <= bitops_cap - problem.fixed_bitops)
        m.setObjective(lin @ x + (x @ Q @ x if Q is not None else 0), gp.GRB.MINIMIZE)
        m.Params.TimeLimit, m.Params.MIPGap, m.Params.Seed, m.Params.Threads = time_limit, mip_gap, 0, 1
        m.Params.NonConvex = 2  # an indefinite Q (and a PSD one that rounding leaves a hair short)
        if node_limit is not None:
            m.Params.NodeLimit = int(node_limit)
        if x0 is not None:
            x.Start = x0
        m.optimize()
    except gp.GurobiError as err:
        raise RuntimeError(f"gurobi cannot solve this problem ({problem.n} binaries): {err}; "
                           "the pip licence is size-limited, use solver.backend: auto, highs or scip") from None
    sol = (np.asarray(x.X) > 0.5).astype(np.int64) if m.SolCount else None
    stop = {gp.GRB.OPTIMAL: "optimal", gp.GRB.NODE_LIMIT: "node_limit"}.get(m.Status, "time_limit")
    return sol, stop, float(m.ObjBound)


# ---- SCIP: a convex MIQP through the diagonal shift ------------------------------------------------
def _scip(problem: Problem, size_cap, bitops_cap, time_limit, mip_gap, x0, node_limit=None):
    """A convex form as t ≥ ‖Fᵀx‖², Q = F Fᵀ: SCIP's convex MINLP branch and bound. A PSD G as it is
    (_convex_form), an indefinite one in its QCR form (qcr.py): measured on the default model's raw
    problem at 2.5-4 bits, 60 s left gaps of 0.19-0.21 (one proven in 44 s) where the diagonal
    shift left gaps above 10."""
    from pyscipopt import Model, quicksum

    form = _qcr_if_indefinite(problem, size_cap, bitops_cap)
    Q, lin = form if form is not None else _convex_form(problem)
    m = Model()
    m.hideOutput()
    m.setParam("limits/time", float(time_limit))
    m.setParam("limits/gap", float(mip_gap))
    m.setParam("randomization/randomseedshift", 0)
    if node_limit is not None:
        m.setParam("limits/nodes", int(node_limit))
    x = [m.addVar(vtype="B") for _ in range(problem.n)]
    for ix in problem.layers:
        m.addCons(quicksum(x[i] for i in ix) == 1)
    if size_cap is not None:
        m.addCons(quicksum(float(problem.size_bits[i]) * x[i] for i in range(problem.n))
                  <= size_cap - problem.fixed_size_bits)
    if bitops_cap is not None:
        m.addCons(quicksum(float(problem.bitops[i]) * x[i] for i in range(problem.n))
                  <= bitops_cap - problem.fixed_bitops)
    obj = quicksum(float(lin[i]) * x[i] for i in range(problem.n))
    if Q is not None:
        lam, V = np.linalg.eigh(Q)  # all >= 0
        keep = lam > 1e-12 * max(1.0, float(lam.max()))
        F = V[:, keep] * np.sqrt(lam[keep])  # (n, r): Q = F Fᵀ
        z = [m.addVar(lb=None) for _ in range(F.shape[1])]
        for j, zj in enumerate(z):
            m.addCons(zj == quicksum(float(F[i, j]) * x[i] for i in range(problem.n) if F[i, j] != 0))
        t = m.addVar(lb=0)
        m.addCons(quicksum(zj * zj for zj in z) <= t)
        obj = obj + t
    m.setObjective(obj, "minimize")
    if x0 is not None:
        start = m.createPartialSol()  # SCIP completes z and t itself
        for i, v in enumerate(x0):
            m.setSolVal(start, x[i], float(v))
        m.addSol(start, free=True)
    m.optimize()
    sol = None
    if m.getNSols():
        best = m.getBestSol()
        sol = (np.array([m.getSolVal(best, v) for v in x]) > 0.5).astype(np.int64)
    stop = {"optimal": "optimal", "nodelimit": "node_limit", "totalnodelimit": "node_limit"}.get(m.getStatus(), "time_limit")
    return sol, stop, float(m.getDualbound())


_BACKENDS = {"highs": _highs, "gurobi": _gurobi, "scip": _scip}


def auto_backends(problem: Problem) -> list:
    """The back-ends `auto` tries, in order, for this problem's structure (measured on the default
    model's 20-layer × 6-option CLADO problems and the synthetic 54-layer ones, bench/solver_bench.py):
    linear (diagonal methods) -> HiGHS (a multiple-choice knapsack MILP, milliseconds);
    PSD G (clado, clado_kl) -> Gurobi's convex MIQP (proven in 0.2-1.4 s), SCIP's convex MINLP where
        Gurobi is missing or its pip licence refuses the size (7-30 s; HiGHS's linearization did not
        close the gap in 30 s);
    indefinite G (clado_raw) -> Gurobi on the QCR form (proven in 1.5-2.3 s), HiGHS on the tight
        linearization where Gurobi is missing or refuses the size (6-13 s; SCIP's diagonal shift
        ran out of time).
    """
    if problem.is_linear:  # no G, or no cross-layer entries
        return ["highs"]
    return ["gurobi", "scip"] if _is_psd(problem) else ["gurobi", "highs"]


def solve(problem: Problem, budget=None, backend: str = "highs", time_limit: float = 60.0,
          mip_gap: float = 1e-4, node_limit: int | dict | None = None) -> Solution:
    """The exact optimum of the problem under the budget(s), or the best decision found in time_limit.

    Args:
        problem: the Problem.
        budget: None, a Budget, a "kind-value" string, or a list of them (all caps apply).
        backend: one of BACKENDS; "auto" picks by the problem's structure (auto_backends) and
            records the back-end it used.
        time_limit: seconds the back-end may run (the incumbent search comes on top, milliseconds).
        mip_gap: relative gap at which the back-end stops.
        node_limit: branch-and-bound nodes after which the back-end stops (None: no limit), or a
            {back-end: nodes} mapping, as a node costs very different work in each (measured on
            the default model: 50 HiGHS nodes take about 7 s, Gurobi explores thousands per
            second). Unlike the time limit it stops at the same point on any machine and under
            any load, so a solve that is not proven optimal still gives the same decision.

    Raises InfeasibleBudget (naming the smallest achievable size or BitOPs) below the minimum.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown solver backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    t0 = time.perf_counter()
    size_cap, bitops_cap = caps_of(budget, problem)
    x0 = _incumbent(problem, size_cap, bitops_cap)
    chain = auto_backends(problem) if backend == "auto" else [backend]
    for i, backend in enumerate(chain):
        try:
            nodes = node_limit.get(backend) if isinstance(node_limit, dict) else node_limit
            x, stop, bound = _BACKENDS[backend](problem, size_cap, bitops_cap, time_limit, mip_gap, x0, nodes)
            break
        except (ImportError, RuntimeError) as err:  # gurobipy missing, or its licence refuses the size
            if i == len(chain) - 1:
                raise
            log.info("solver %s unavailable (%s); trying %s", backend, err, chain[i + 1])
    optimal = stop == "optimal"
    if x is None or not problem.is_feasible(x, size_cap, bitops_cap):
        if x0 is None:
            raise RuntimeError(f"{backend} found no decision within {time_limit} s and no incumbent exists")
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
