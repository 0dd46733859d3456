"""The dispatcher's fallback (only BackendUnavailable moves on) and each back-end's stop reason as it is."""

import importlib
import sys

import highspy
import numpy as np
import pytest
from test_optimize import AVAILABLE, brute_force, make_problem

from mpqflow.optimize import BackendUnavailable, caps_of, solve
from mpqflow.optimize import backends as backends_module

solve_module = importlib.import_module("mpqflow.optimize.solve")


def _raiser(err):
    def backend(problem, *args):
        raise err

    return backend


@pytest.mark.parametrize("err", [RuntimeError("a bug in the back-end"), ValueError("a bad model")])
def test_a_real_error_in_a_backend_propagates_instead_of_falling_back(monkeypatch, err):
    indefinite = make_problem(0, "indefinite")
    monkeypatch.setitem(solve_module._BACKENDS, "gurobi", _raiser(err))  # auto tries gurobi first
    with pytest.raises(type(err), match=str(err)):
        solve(indefinite, "avg_bits-4", backend="auto")


def test_an_unavailable_backend_falls_back_to_the_next(monkeypatch):
    indefinite = make_problem(0, "indefinite")
    chain = solve_module.auto_backends(indefinite)
    monkeypatch.setitem(solve_module._BACKENDS, chain[0], _raiser(BackendUnavailable("licence refuses")))
    sol = solve(indefinite, "avg_bits-4", backend="auto", mip_gap=1e-9)
    assert sol.backend == chain[1] and sol.status == "optimal"
    assert sol.objective == pytest.approx(brute_force(indefinite, "avg_bits-4")[0], rel=1e-7, abs=1e-9)


def test_a_missing_solver_package_is_backend_unavailable(monkeypatch):
    """The real import path: with gurobipy (or pyscipopt) not importable, the back-end raises
    BackendUnavailable (the last of a chain re-raises it) and auto moves on."""
    psd, indefinite = make_problem(0, "psd"), make_problem(0, "indefinite")
    monkeypatch.setitem(sys.modules, "gurobipy", None)  # `import gurobipy` now raises ImportError
    with pytest.raises(BackendUnavailable, match="gurobipy is not installed"):
        solve(indefinite, "avg_bits-4", backend="gurobi")
    assert solve(indefinite, "avg_bits-4", backend="auto").backend == solve_module.auto_backends(indefinite)[1]
    monkeypatch.setitem(sys.modules, "pyscipopt", None)
    with pytest.raises(BackendUnavailable, match="pyscipopt is not installed"):
        solve(psd, "avg_bits-4", backend="auto")  # gurobi, then scip: both missing


def test_scip_stopping_at_its_gap_limit_is_reported_as_gap_limit():
    problem = make_problem(0, "indefinite", L=5)
    loose = solve(problem, "avg_bits-4", backend="scip", mip_gap=0.5)
    assert loose.status == "gap_limit" and loose.to_dict()["status"] == "gap_limit"
    assert 0 < loose.gap <= 0.5 and loose.bound < loose.objective
    tight = solve(problem, "avg_bits-4", backend="scip", mip_gap=1e-9)
    assert tight.status == "optimal" and tight.objective == pytest.approx(loose.objective, rel=1e-9)


def test_highs_statuses_keep_their_own_name():
    stop = backends_module._highs_stop
    S = highspy.HighsModelStatus
    assert [
        stop(s) for s in (S.kOptimal, S.kTimeLimit, S.kSolutionLimit, S.kInfeasible, S.kIterationLimit, S.kMemoryLimit)
    ] == ["optimal", "time_limit", "node_limit", "infeasible", "iteration_limit", "memory_limit"]


def test_scip_statuses_keep_their_own_name():
    names = backends_module._SCIP_STOPS
    assert names["gaplimit"] == "gap_limit" and names["timelimit"] == "time_limit"
    assert names["nodelimit"] == names["totalnodelimit"] == "node_limit" and names["optimal"] == "optimal"
    assert len(set(names.values()) - {"node_limit"}) == len(names) - 2  # no two other reasons share a name


@pytest.mark.skipif("gurobi" not in AVAILABLE, reason="gurobipy missing or unlicensed")
def test_gurobi_statuses_keep_their_own_name():
    import gurobipy as gp

    stop = lambda s: backends_module._gurobi_stop(gp, s)  # noqa: E731
    assert [stop(s) for s in (gp.GRB.OPTIMAL, gp.GRB.TIME_LIMIT, gp.GRB.NODE_LIMIT, gp.GRB.SUBOPTIMAL)] == [
        "optimal",
        "time_limit",
        "node_limit",
        "suboptimal",
    ]


@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b != "auto"])
def test_each_backend_alone_reports_the_stop_it_reached(backend):
    """Called directly, with a node limit of 1 on a problem no root proves: node_limit, not time_limit."""
    problem = make_problem(3, "indefinite", L=20, K=3)
    _, stop, bound = backends_module.FUNCTIONS[backend](problem, *caps_of("avg_bits-4", problem), 300.0, 1e-9, None, 1)
    assert stop == "node_limit" and np.isfinite(bound)
