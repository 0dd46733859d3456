"""The exact back-ends: HiGHS (tight linearization), Gurobi (convex MIQP), SCIP (convex MINLP).

Usage:
    x, stop, bound = highs(problem, size_cap, bitops_cap, latency_cap, time_limit, mip_gap, x0, node_limit)
    # the same signature for gurobi and scip; FUNCTIONS maps a back-end's name to it

Each cap that is not None (total bits, BitOPs, ms: Problem.cap_rows) is one linear row
cost . x <= cap - fixed.

x: the back-end's best decision ((n,) 0/1) or None; stop: the back-end's own stop reason in one
vocabulary ("optimal", "node_limit", "time_limit", "gap_limit", "infeasible", ...); bound: its dual
bound on the objective. A back-end whose package is missing or whose licence refuses the problem's
size raises BackendUnavailable; any other error is a real one and propagates.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

import numpy as np

from .forms import convex_form, cross_layer_quadratic, is_psd, qcr_if_indefinite
from .problem import Problem

__all__ = ["BackendUnavailable", "FUNCTIONS", "highs", "gurobi", "scip"]


class BackendUnavailable(RuntimeError):
    """The back-end cannot run here: its package is missing, or its licence refuses the problem."""


def _require(module: str, backend: str):
    """The imported solver package, or BackendUnavailable naming the back-end."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise BackendUnavailable(f"{backend}: {module} is not installed ({err})") from None


# ---- HiGHS: the tight linearization ---------------------------------------------------------------
def _silent_highs(highspy):
    """A highspy.Highs without the banner its constructor writes to file descriptor 1 before any
    option can turn output off (it went into every solve job's stdout, not the rule's log)."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _highs_stop(status) -> str:
    """HiGHS's model status in the common vocabulary: kSolutionLimit is the node limit (mip_max_nodes
    is the only such limit set here), every other kCamelCase name becomes snake_case (kTimeLimit ->
    time_limit, kOptimal -> optimal, kInfeasible -> infeasible)."""
    if status.name == "kSolutionLimit":
        return "node_limit"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", status.name.removeprefix("k")).lower()


def highs(problem: Problem, size_cap, bitops_cap, latency_cap, time_limit, mip_gap, x0, node_limit=None):
    """min Σ_a c_a x_a + Σ_{a<c cross-layer} 2 G_ac y_ac, with Σ_{c∈m} y_ac = x_a for every a and layer m ≠ l(a).

    With x binary these equalities force y_ac = x_a x_c, so y stays continuous in [0, 1].
    """
    highspy = _require("highspy", "highs")
    import scipy.sparse as sp

    n, lin, G = problem.n, problem.linear_terms(), cross_layer_quadratic(problem)
    pairs = (
        np.zeros((0, 2), np.int64)
        if G is None
        else np.argwhere(np.triu(problem.layer_of[:, None] != problem.layer_of[None, :], 1))
    )  # (P, 2), a < c
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
    for row_cost, fixed, cap in problem.cap_rows(size_cap, bitops_cap, latency_cap):
        add_row(np.arange(n), row_cost, -np.inf, cap - fixed)
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
    A = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(lo), n + P))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n + P, len(lo)
    lp.col_cost_ = cost
    lp.col_lower_ = np.zeros(n + P)
    lp.col_upper_ = np.ones(n + P)
    lp.row_lower_, lp.row_upper_ = np.array(lo, float), np.array(hi, float)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n + [highspy.HighsVarType.kContinuous] * P
    h = _silent_highs(highspy)
    for k, v in (
        ("output_flag", False),
        ("time_limit", float(time_limit)),
        ("mip_rel_gap", float(mip_gap)),
        ("random_seed", 0),
        ("threads", 1),
        ("presolve", "on"),
    ):
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
    info = h.getInfo()
    x = None
    if info.primal_solution_status == 2:  # feasible
        x = (np.asarray(h.getSolution().col_value[:n]) > 0.5).astype(np.int64)
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else -np.inf
    return x, _highs_stop(h.getModelStatus()), bound


# ---- Gurobi: the binary QP natively ---------------------------------------------------------------
def _gurobi_unavailable(n: int, err) -> BackendUnavailable:
    return BackendUnavailable(
        f"gurobi cannot solve this problem ({n} binaries): {err}; the pip licence "
        "is size-limited, use solver.backend: auto, highs or scip"
    )


def _is_licence_error(gp, err) -> bool:
    """True for Gurobi's 'no licence' and 'model too large for the licence' errors."""
    return getattr(err, "errno", None) in (gp.GRB.Error.NO_LICENSE, gp.GRB.Error.SIZE_LIMIT_EXCEEDED)


def _gurobi_check_licence(gp, n: int) -> None:
    """BackendUnavailable if Gurobi's licence refuses a binary QP with n variables (the pip licence's
    size limit); milliseconds, on an almost empty model."""
    try:
        m = gp.Model(env=gp.Env(params={"OutputFlag": 0}))
        x = m.addMVar(n, vtype=gp.GRB.BINARY)
        m.setObjective(x[0] * x[-1])
        m.Params.TimeLimit = 0.0
        m.optimize()
    except gp.GurobiError as err:
        if not _is_licence_error(gp, err):
            raise
        raise _gurobi_unavailable(n, err) from None


def _gurobi_stop(gp, status: int) -> str:
    """Gurobi's status by its own name, lower case (OPTIMAL -> optimal, NODE_LIMIT -> node_limit)."""
    names = {getattr(gp.GRB.Status, k): k.lower() for k in dir(gp.GRB.Status) if k.isupper()}
    return names.get(status, f"status_{status}")


def gurobi(problem: Problem, size_cap, bitops_cap, latency_cap, time_limit, mip_gap, x0, node_limit=None):
    """Gurobi's convex MIQP branch and bound. An indefinite G (clado_raw) goes in as its QCR form
    (qcr.py): exact on every decision, PSD, and as strong at the root as the SDP bound. A PSD G goes
    in as it is (convex_form). Should SCS fail, an indefinite G falls back to Gurobi's native
    nonconvex binary QP (the diagonal shift's relaxation is too weak to close the gap)."""
    gp = _require("gurobipy", "gurobi")
    _gurobi_check_licence(gp, problem.n)  # before the QCR's SDP spends seconds on a model it would refuse
    form = qcr_if_indefinite(problem, size_cap, bitops_cap, latency_cap)
    if form is not None:
        Q, lin = form
    elif not problem.is_linear and not is_psd(problem):  # SCS failed
        Q, lin = cross_layer_quadratic(problem), problem.linear_terms()
    else:
        Q, lin = convex_form(problem)
    try:
        env = gp.Env(params={"OutputFlag": 0})
        m = gp.Model(env=env)
        x = m.addMVar(problem.n, vtype=gp.GRB.BINARY)
        for ix in problem.layers:
            m.addConstr(x[ix].sum() == 1)
        for cost, fixed, cap in problem.cap_rows(size_cap, bitops_cap, latency_cap):
            m.addConstr(cost @ x <= cap - fixed)
        m.setObjective(lin @ x + (x @ Q @ x if Q is not None else 0), gp.GRB.MINIMIZE)
        m.Params.TimeLimit, m.Params.MIPGap, m.Params.Seed, m.Params.Threads = time_limit, mip_gap, 0, 1
        m.Params.NonConvex = 2  # an indefinite Q (and a PSD one that rounding leaves a hair short)
        if node_limit is not None:
            m.Params.NodeLimit = int(node_limit)
        if x0 is not None:
            x.Start = x0
        m.optimize()
    except gp.GurobiError as err:
        if not _is_licence_error(gp, err):
            raise
        raise _gurobi_unavailable(problem.n, err) from None
    sol = (np.asarray(x.X) > 0.5).astype(np.int64) if m.SolCount else None
    return sol, _gurobi_stop(gp, m.Status), float(m.ObjBound)


# ---- SCIP: a convex MINLP -------------------------------------------------------------------------
_SCIP_STOPS = {
    "optimal": "optimal",
    "timelimit": "time_limit",
    "nodelimit": "node_limit",
    "totalnodelimit": "node_limit",
    "stallnodelimit": "stall_node_limit",
    "gaplimit": "gap_limit",
    "memlimit": "memory_limit",
    "sollimit": "solution_limit",
    "bestsollimit": "best_solution_limit",
    "restartlimit": "restart_limit",
    "userinterrupt": "interrupted",
}


def scip(problem: Problem, size_cap, bitops_cap, latency_cap, time_limit, mip_gap, x0, node_limit=None):
    """A convex form as t ≥ ‖Fᵀx‖², Q = F Fᵀ: SCIP's convex MINLP branch and bound. A PSD G as it is
    (convex_form), an indefinite one in its QCR form (qcr.py), whose root bound is far stronger than
    the diagonal shift's. SCIP stopping at limits/gap is reported as gap_limit, not optimal."""
    pyscipopt = _require("pyscipopt", "scip")
    Model, quicksum = pyscipopt.Model, pyscipopt.quicksum

    form = qcr_if_indefinite(problem, size_cap, bitops_cap, latency_cap)
    Q, lin = form if form is not None else convex_form(problem)
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
    for cost, fixed, cap in problem.cap_rows(size_cap, bitops_cap, latency_cap):
        m.addCons(quicksum(float(cost[i]) * x[i] for i in range(problem.n)) <= cap - fixed)
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
    status = m.getStatus()
    return sol, _SCIP_STOPS.get(status, status), float(m.getDualbound())


FUNCTIONS = {"highs": highs, "gurobi": gurobi, "scip": scip}
