"""The benchmark scripts' instance builders and bounds (they are not run by CI otherwise)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import relaxation_bound  # noqa: E402
import solver_bench  # noqa: E402
from test_optimize import brute_force, make_problem  # noqa: E402

OPTS = [(w, a) for a in (4, 8) for w in (2, 4, 8)]


def _real_like_G(L=5, seed=0):
    """A symmetric indefinite stand-in for a real 5-layer x 6-option CLADO matrix."""
    A = np.random.default_rng(seed).normal(size=(L * 6, L * 6)) * 1e-3
    return (A + A.T) / 2


@pytest.mark.parametrize("raw", [False, True])
def test_synthetic_instance_copies_real_blocks_with_resnet50_costs(raw):
    real = _real_like_G()
    p = solver_bench.synthetic_problem(real, OPTS, K=3, raw=raw, layers=8)
    numel, macs = solver_bench.resnet50_costs()
    assert (p.L, p.n) == (8, 24) and p.options[:3] == [(2, 8), (4, 8), (8, 8)]
    assert np.allclose(p.size_bits, np.repeat(numel[:8], 3) * np.tile([2, 4, 8], 8))
    assert np.allclose(p.bitops, np.repeat(macs[:8], 3) * np.tile([16, 32, 64], 8))
    if raw:  # every off-diagonal block is one of the real matrix's A8 blocks
        a8 = [i for i, (w, a) in enumerate(OPTS) if a == 8]
        blocks = [real[np.ix_([q * 6 + i for i in a8], [r * 6 + i for i in a8])] for q in range(5) for r in range(5)]
        assert any(np.array_equal(p.G[0:3, 3:6], b) for b in blocks)
    else:
        assert np.linalg.eigvalsh(p.G)[0] >= -1e-12


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_shor_bound_is_below_the_brute_force_optimum():
    problem = make_problem(0, "indefinite", L=4, K=3)
    budget = "avg_bits-4"
    optimum = brute_force(problem, budget)[0]
    bound = relaxation_bound.shor_bound(problem, budget)
    # SCS is accurate to about 1e-6 of the scale; a bound above the optimum would be a wrong relaxation.
    assert np.isfinite(bound) and bound <= optimum + 1e-4 * max(1.0, abs(optimum))


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_shor_bound_is_exact_for_a_diagonal_objective_under_a_loose_budget():
    """Then the relaxation is the multiple-choice LP, whose optimum is integral: Σ_l min_a G_aa."""
    problem = make_problem(1, "diagonal", L=4, K=3)
    expected = sum(np.diag(problem.G)[ix].min() for ix in problem.layers)
    assert relaxation_bound.shor_bound(problem, "avg_bits-8") == pytest.approx(expected, abs=1e-4)
