"""The solve layer: every back-end returns the brute-force optimum, budgets, infeasibility, time limits."""

import importlib
import itertools

import numpy as np
import pytest

from mpqflow.optimize import (
    BACKENDS,
    BackendUnavailable,
    Budget,
    InfeasibleBudget,
    Problem,
    caps_of,
    local_search,
    parse_budgets,
    solve,
)
from mpqflow.optimize.incumbent import incumbent, repair
from mpqflow.optimize.solve import auto_backends

solve_module = importlib.import_module("mpqflow.optimize.solve")  # the module; the package's `solve` is the function

OPTIONS = [(2, 4), (4, 8), (8, 8)]


def _gurobi_ok():
    try:
        import gurobipy as gp

        gp.Model(env=gp.Env(params={"OutputFlag": 0}))
        return True
    except Exception:  # not installed or no licence
        return False


AVAILABLE = [b for b in BACKENDS if b != "gurobi" or _gurobi_ok()]


def make_problem(seed, kind, L=5, K=3, options=None):
    """A random instance: weight counts and MACs per layer, G of the given kind, K options per layer
    (the first K of OPTIONS unless `options` names them)."""
    rng = np.random.default_rng(seed)
    n = L * K
    layer_of = np.repeat(np.arange(L), K)
    A = rng.normal(size=(n, n))
    G = {
        "indefinite": (A + A.T) / 2,
        "psd": A @ A.T / n,
        "diagonal": np.diag(rng.uniform(0, 1, n)),
        "zeros": np.where(rng.uniform(size=(n, n)) < 0.6, 0.0, (A + A.T) / 2),
    }.get(kind)
    if kind == "zeros":
        G = np.triu(G) + np.triu(G, 1).T
    linear = rng.uniform(0, 1, n) if kind == "linear" else None
    numel = rng.integers(100, 2000, L).astype(float)
    macs = rng.integers(10_000, 200_000, L).astype(float)
    opts = list(options or OPTIONS[:K]) * L
    return Problem(
        G=G,
        linear=linear,
        layer_of=layer_of,
        layer_names=[f"layer{l}" for l in range(L)],
        options=opts,
        size_bits=np.array([numel[l] * w for l, (w, _) in zip(layer_of, opts)]),
        bitops=np.array([macs[l] * w * a for l, (w, a) in zip(layer_of, opts)]),
        fixed_size_bits=8 * 500.0,
        fixed_bitops=64 * 50_000.0,
    )


def brute_force(problem, budget):
    """(best objective, its x) by enumerating every one-hot decision within the budget."""
    size_cap, bitops_cap, _ = (None, None, None) if budget is None else Budget.parse(budget).to_caps(problem)
    best = (np.inf, None)
    for choice in itertools.product(*problem.layers):
        x = problem.x_of(choice)
        if problem.is_feasible(x, size_cap, bitops_cap):
            best = min(best, (problem.objective(x), tuple(x)), key=lambda t: t[0])
    return best


def _mid_budgets(problem):
    """One budget of each kind halfway between the cheapest and the all-8-bit model."""
    size = (problem.min_size_bits() + problem.reference_size_bits) / 2
    ops = (problem.min_bitops() + problem.reference_bitops) / 2
    return [
        f"avg_bits-{size / problem.total_numel:.4f}",
        f"size_mb-{size / 8e6:.8f}",
        f"size_rel-{size / problem.reference_size_bits:.4f}",
        f"gbitops-{ops / 1e9:.8f}",
        f"bitops_rel-{ops / problem.reference_bitops:.4f}",
        None,
    ]


@pytest.mark.parametrize("kind", ["indefinite", "psd", "diagonal", "zeros", "linear"])
@pytest.mark.parametrize("backend", AVAILABLE)
def test_every_backend_finds_the_brute_force_optimum(kind, backend):
    for seed in range(2):
        problem = make_problem(seed, kind)
        for budget in _mid_budgets(problem):
            best, _ = brute_force(problem, budget)
            sol = solve(problem, budget, backend=backend, time_limit=30, mip_gap=1e-9)
            assert sol.status == "optimal", (kind, budget)
            assert sol.objective == pytest.approx(best, rel=1e-7, abs=1e-9), (kind, seed, budget, backend)
            size_cap, bitops_cap, _ = (None, None, None) if budget is None else Budget.parse(budget).to_caps(problem)
            assert problem.is_feasible(sol.x, size_cap, bitops_cap)
            assert sol.bound <= sol.objective + 1e-9 and sol.gap <= 1e-6


def test_auto_picks_the_backend_by_structure_and_falls_back(monkeypatch):
    """auto: HiGHS for linear objectives, Gurobi for a G with cross-layer terms (PSD as given,
    indefinite in its QCR form), SCIP (PSD) or HiGHS (indefinite) where Gurobi refuses (its pip
    licence is size-limited); the Solution names the back-end that solved it."""
    psd, indefinite, linear = (make_problem(0, kind) for kind in ("psd", "indefinite", "linear"))
    assert auto_backends(psd) == ["gurobi", "scip"]
    assert auto_backends(indefinite) == ["gurobi", "highs"]
    assert auto_backends(linear) == ["highs"]
    assert solve(linear, "avg_bits-4", backend="auto").backend == "highs"
    if "gurobi" in AVAILABLE:
        assert solve(indefinite, "avg_bits-4", backend="auto").backend == "gurobi"

    def refuse(problem, *args):
        raise BackendUnavailable(f"gurobi cannot solve this problem ({problem.n} binaries): Model too large")

    monkeypatch.setitem(solve_module._BACKENDS, "gurobi", refuse)
    for problem, fallback in ((psd, "scip"), (indefinite, "highs")):
        budget = _mid_budgets(problem)[0]
        sol = solve(problem, budget, backend="auto", mip_gap=1e-9)
        assert sol.backend == fallback and sol.status == "optimal"
        assert sol.objective == pytest.approx(brute_force(problem, budget)[0], rel=1e-7, abs=1e-9)


def test_falling_sensitivities_without_budget_choose_highest_precision():
    problem = make_problem(0, "diagonal")
    # Sensitivity 1/w_bits^2 of each option: more bits, less loss.
    G = np.diag([1.0 / w**2 for w, _ in problem.options])
    problem = Problem(
        G=G,
        layer_of=problem.layer_of,
        layer_names=problem.layer_names,
        options=problem.options,
        size_bits=problem.size_bits,
        bitops=problem.bitops,
    )
    for backend in AVAILABLE:
        sol = solve(problem, None, backend=backend)
        assert all(opt == (8, 8) for opt in sol.decision.values()), backend


def test_infeasible_budget_names_the_smallest_size():
    problem = make_problem(0, "psd")
    smallest = problem.min_size_bits() / problem.total_numel
    with pytest.raises(InfeasibleBudget, match=f"smallest achievable size is {smallest:.6g} average bits"):
        solve(problem, "avg_bits-1.5")
    with pytest.raises(InfeasibleBudget, match="smallest achievable BitOPs"):
        solve(problem, "bitops_rel-0.01")


def _conflicting_costs_problem(L=5, seed=0):
    """Options W2A8 (smallest size, most BitOPs) and W4A2 (fewest BitOPs, larger size): a tight
    size cap and a tight BitOPs cap exclude each other."""
    return make_problem(seed, "indefinite", L=L, K=2, options=[(2, 8), (4, 2)])


def test_jointly_infeasible_budgets_name_both_and_the_smallest_bitops_within_the_size():
    problem = _conflicting_costs_problem()
    size, ops = (
        Budget("avg_bits", 1.01 * problem.min_size_bits() / problem.total_numel),
        Budget("bitops_rel", 1.01 * problem.min_bitops() / problem.reference_bitops),
    )
    size_cap, bitops_cap, _ = caps_of([size, ops], problem)  # each alone is feasible
    decisions = [problem.x_of(ch) for ch in itertools.product(*problem.layers)]
    assert not any(problem.is_feasible(x, size_cap, bitops_cap) for x in decisions)
    least_ops = min(problem.total_bitops(x) for x in decisions if problem.is_feasible(x, size_cap))
    least_size = min(problem.total_size_bits(x) for x in decisions if problem.is_feasible(x, None, bitops_cap))
    for backend in AVAILABLE:
        with pytest.raises(InfeasibleBudget) as err:
            solve(problem, [size, ops], backend=backend)
        msg = str(err.value)
        assert size.name in msg and ops.name in msg and "jointly infeasible" in msg, msg
        assert f"BitOPs are {least_ops / problem.reference_bitops:.6g} of the all-W8A8 BitOPs" in msg, msg
        assert f"size is {least_size / problem.total_numel:.6g} average bits" in msg, msg


def test_jointly_feasible_budgets_that_no_cheapest_choice_meets_are_solved():
    """Neither the smallest-size nor the smallest-BitOPs choice meets both caps, a mix does: the
    feasibility check must not refuse it, and the back-end finds the optimum without an incumbent."""
    problem = _conflicting_costs_problem()
    w4a2 = problem.x_of([ix[1] for ix in problem.layers])
    size = Budget("size_mb", (problem.min_size_bits() + problem.total_size_bits(w4a2)) / 2 / 8e6)
    ops = Budget(
        "gbitops",
        (problem.min_bitops() + problem.total_bitops(problem.x_of([ix[0] for ix in problem.layers]))) / 2 / 1e9,
    )
    caps = caps_of([size, ops], problem)
    assert problem.min_both(*caps) is None
    best = min(
        problem.objective(problem.x_of(ch))
        for ch in itertools.product(*problem.layers)
        if problem.is_feasible(problem.x_of(ch), *caps)
    )
    for backend in AVAILABLE:
        sol = solve(problem, [size, ops], backend=backend, mip_gap=1e-9)
        assert problem.is_feasible(sol.x, *caps) and sol.status == "optimal", backend
        assert sol.objective == pytest.approx(best, rel=1e-7, abs=1e-9), backend


def test_time_limit_returns_a_feasible_decision_with_its_gap():
    problem = make_problem(3, "indefinite", L=40, K=3)
    sol = solve(problem, "avg_bits-4", backend="highs", time_limit=0.05)
    size_cap = Budget.parse("avg_bits-4").to_caps(problem).size_bits
    assert problem.is_feasible(sol.x, size_cap)
    assert sol.status == "time_limit" and sol.gap > 0 and sol.bound < sol.objective
    assert sol.to_dict()["status"] == "time_limit"


@pytest.mark.parametrize("backend", AVAILABLE)
def test_node_limit_is_a_reproducible_stop(backend):
    """A solve stopped by its node limit gives the same decision however much time it was allowed
    (a time-limited one depends on the machine's speed and load)."""
    problem = make_problem(3, "indefinite", L=20, K=3)
    size_cap = Budget.parse("avg_bits-4").to_caps(problem).size_bits
    a, b = (solve(problem, "avg_bits-4", backend=backend, time_limit=t, node_limit=3) for t in (300, 600))
    assert a.status == b.status == "node_limit"
    assert np.array_equal(a.x, b.x) and a.objective == b.objective
    assert problem.is_feasible(a.x, size_cap) and a.gap > 0
    assert a.to_dict()["status"] == "node_limit"


def test_node_limit_per_backend(monkeypatch):
    """A {back-end: nodes} mapping applies the back-end's own limit (auto resolves to HiGHS here,
    Gurobi refusing)."""

    def refuse(problem, *args):
        raise BackendUnavailable("gurobi cannot solve this problem: Model too large")

    monkeypatch.setitem(solve_module._BACKENDS, "gurobi", refuse)
    problem = make_problem(3, "indefinite", L=20, K=3)
    a = solve(problem, "avg_bits-4", backend="auto", node_limit={"highs": 3, "gurobi": 10**6})
    b = solve(problem, "avg_bits-4", backend="highs", node_limit=3)
    assert a.backend == "highs" and a.status == "node_limit" and np.array_equal(a.x, b.x)


@pytest.mark.parametrize("kind", ["indefinite", "psd"])
def test_incumbent_is_feasible_deterministic_and_no_worse_than_plain_descent(kind):
    problem = make_problem(5, kind, L=12, K=3)
    for budget in _mid_budgets(problem)[:-1]:
        caps = caps_of(budget, problem)
        x = incumbent(problem, *caps)
        assert problem.is_feasible(x, *caps), budget
        assert np.array_equal(x, incumbent(problem, *caps))
        plain = local_search(problem, problem.min_both(*caps), *caps)
        assert problem.objective(x) <= problem.objective(plain) + 1e-12


def test_repair_brings_the_all_8_bit_choice_within_both_caps():
    problem = make_problem(2, "indefinite", L=10)
    size_cap, bitops_cap, _ = caps_of(["avg_bits-4", "bitops_rel-0.3"], problem)
    top = np.array([ix[-1] for ix in problem.layers])  # (8, 8) everywhere: over both caps
    assert not problem.is_feasible(problem.x_of(top), size_cap, bitops_cap)
    fixed = repair(problem, top, size_cap, bitops_cap)
    assert problem.is_feasible(problem.x_of(fixed), size_cap, bitops_cap)
    assert np.array_equal(repair(problem, fixed, size_cap, bitops_cap), fixed)  # nothing to do


def test_same_problem_same_decision():
    problem = make_problem(1, "indefinite", L=8)
    a, b = (solve(problem, "avg_bits-4.5", backend="highs") for _ in range(2))
    assert np.array_equal(a.x, b.x) and a.decision == b.decision


def test_budget_names_round_trip_and_bad_specs():
    for spec in ["avg_bits-3.5", "size_mb-0.12", "size_rel-0.5", "gbitops-1.2", "bitops_rel-0.25"]:
        assert Budget.parse(spec).name == spec and Budget.parse(Budget.parse(spec).name) == Budget.parse(spec)
    assert parse_budgets("avg_bits-4+bitops_rel-0.3") == (Budget("avg_bits", 4), Budget("bitops_rel", 0.3))
    with pytest.raises(ValueError, match="unknown budget kind 'bits'"):
        Budget.parse("bits-4")
    with pytest.raises(ValueError, match="positive"):
        Budget.parse("avg_bits--1")
    with pytest.raises(ValueError, match="kind-value"):
        Budget.parse("avg_bits")


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown solver backend 'cplex'"):
        solve(make_problem(0, "psd"), None, backend="cplex")
