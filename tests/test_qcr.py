"""The QCR form: exact on every decision, PSD, and a relaxation at least as strong as the diagonal shift's."""

import itertools

import cvxpy as cp
import numpy as np
import pytest
from test_optimize import make_problem

from mpqflow.optimize import caps_of
from mpqflow.optimize.qcr import qcr_form


def _relaxation(problem, Q, c, size_cap):
    """min xᵀQx + c·x over one option per layer relaxed to simplices, under the size cap."""
    x = cp.Variable(problem.n, nonneg=True)
    cons = [cp.sum(x[ix]) == 1 for ix in problem.layers]
    cons.append(problem.size_bits @ x <= size_cap - problem.fixed_size_bits)
    return cp.Problem(cp.Minimize(cp.quad_form(x, cp.psd_wrap(Q)) + c @ x), cons).solve(solver="CLARABEL")


@pytest.mark.parametrize("kind", ["indefinite", "psd", "zeros"])
def test_qcr_form_is_exact_on_every_decision_and_psd(kind):
    problem = make_problem(3, kind, L=4, K=3)
    size_cap, bitops_cap, _ = caps_of(["avg_bits-4", "bitops_rel-0.5"], problem)
    Q, c = qcr_form(problem, size_cap, bitops_cap)
    assert np.linalg.eigvalsh(Q)[0] >= 0
    for choice in itertools.product(*problem.layers):
        x = problem.x_of(choice).astype(float)
        assert x @ Q @ x + c @ x == pytest.approx(problem.objective(x), rel=1e-9, abs=1e-9)


def test_qcr_relaxation_is_stronger_than_the_diagonal_shift():
    problem = make_problem(4, "indefinite", L=5, K=3)
    size_cap = caps_of("avg_bits-4", problem).size_bits
    Q, c = qcr_form(problem, size_cap, None)
    lam = -np.linalg.eigvalsh(problem.G)[0]
    shifted = _relaxation(problem, problem.G + lam * np.eye(problem.n), -lam * np.ones(problem.n), size_cap)
    qcr = _relaxation(problem, Q, c, size_cap)
    optimum = min(
        problem.objective(problem.x_of(ch))
        for ch in itertools.product(*problem.layers)
        if problem.is_feasible(problem.x_of(ch), size_cap)
    )
    assert shifted < qcr <= optimum + 1e-6
    assert optimum - qcr < 0.5 * (optimum - shifted)  # closes at least half the shift's gap
