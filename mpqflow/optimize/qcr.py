"""Quadratic convex reformulation (QCR) of a Problem: an exact convex objective with an SDP-strength
continuous relaxation, for a convex MIQP solver.

Usage:
    form = qcr_form(problem, size_cap, bitops_cap, latency_cap)   # None if the SDP solver fails
    Q, c = form                                       # xᵀQx + c·x = xᵀGx + linear·x on every decision

On a one-hot binary x three families of terms vanish: x_a² − x_a, x_a·x_b for two options a ≠ b of
one layer, and x_b·(Σ_{a∈l} x_a − 1) for any option b and layer l. Subtracting any combination of
them leaves the objective unchanged on every decision, and QCR (Billionnet, Elloumi and Plateau,
2009) picks the combination by an SDP: the one that leaves a PSD quadratic whose continuous
relaxation (one option per layer as a simplex, the caps) has the largest minimum. That minimum is
the Shor SDP bound; a convex MIQP branch and bound (Gurobi) then starts from it instead of the
weak bound of a diagonal shift.

The SDP is the Lagrangian dual, solved by SCS through cvxpy to a loose tolerance: only the bound's
strength depends on its accuracy, not exactness, because the final matrix is made PSD by an exact
diagonal shift (the first family again) whatever SCS returns.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import scipy.sparse as sp

from .problem import Problem

__all__ = ["qcr_form", "min_eigenvalue", "shift_to_psd"]
log = logging.getLogger("mpqflow")


def min_eigenvalue(M: np.ndarray) -> tuple[float, float]:
    """(λ_min(M), the rounding tolerance below 0 at which M still counts as PSD)."""
    eig = np.linalg.eigvalsh(np.asarray(M, float))
    return float(eig[0]), 1e-9 * max(1e-12, float(np.abs(eig).max()))


def shift_to_psd(Q: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q + λI, c − λ), λ = max(0, −λ_min(Q)) plus the tolerance (so that a back-end's own PSD check
    passes): the same objective on every binary x, since x_a² = x_a, and PSD."""
    lam_min, tol = min_eigenvalue(Q)
    lam = max(0.0, -lam_min) + tol
    return np.asarray(Q, float) + lam * np.eye(len(c)), c - lam


def _perturbation_maps(problem: Problem):
    """Sparse maps from the multipliers to the matrix they subtract.

    Returns (E, S, diag_k): E (n, L) the layer indicator; S (n², m) maps the m within-layer entries
    v (a ≤ b, one layer; the diagonal ones are the x_a² − x_a multipliers) to a symmetric n × n
    matrix, row-major; diag_k (n,) the positions of the diagonal entries in v.
    """
    n, lo = problem.n, problem.layer_of
    E = sp.csr_matrix((np.ones(n), (np.arange(n), lo)), shape=(n, problem.L))
    a, b = np.nonzero(np.triu(lo[:, None] == lo[None, :]))  # (m,) within-layer pairs, a <= b
    k = np.arange(len(a))
    off = a != b
    rows = np.concatenate([a * n + b, (b * n + a)[off]])
    cols = np.concatenate([k, k[off]])
    S = sp.csc_matrix((np.ones(len(rows)), (rows, cols)), shape=(n * n, len(a)))
    diag_k = k[~off][np.argsort(a[~off])]
    return E, S, diag_k


def qcr_form(
    problem: Problem,
    size_cap: float | None,
    bitops_cap: float | None,
    latency_cap: float | None = None,
    eps: float = 1e-4,
    max_iters: int = 20000,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(Q, c): xᵀQx + c·x equals the problem's objective on every one-hot binary x, and Q ⪰ 0.

    None when the SDP solver does not return a solution (the caller falls back to a plain shift).
    The SDP's value (logged) is the relaxation bound only to SCS's tolerance, so it is not reported
    as a bound: the MIQP solver's own bound is.
    """
    import cvxpy as cp

    t0 = time.perf_counter()
    n, L = problem.n, problem.L
    G = np.asarray(problem.G, float)
    c = np.zeros(n) if problem.linear is None else np.asarray(problem.linear, float)
    E, S, diag_k = _perturbation_maps(problem)
    v = cp.Variable(S.shape[1])  # within-layer multipliers (diagonal ones: x_a² − x_a)
    A = cp.Variable((n, L))  # A[b, l]: multiplier of x_b (Σ_{a∈l} x_a − 1)
    beta = cp.Variable(L)  # one option per layer
    t = cp.Variable()
    # The caps as Σ (cost/cap) x ≤ 1 - fixed/cap: scaled to O(1), which SCS needs to converge.
    caps = [(cost / cap, 1.0 - fixed / cap) for cost, fixed, cap in problem.cap_rows(size_cap, bitops_cap, latency_cap)]
    mu = cp.Variable(len(caps), nonneg=True) if caps else None
    # Subtracted: xᵀMx + m·x, M = mat(S v) + (A Eᵀ + E Aᵀ)/2, m = −v_diag − A·1 (zero on decisions).
    M = cp.reshape(S @ v, (n, n), order="C") + (A @ E.T + E @ A.T) / 2
    m = -v[diag_k] - cp.sum(A, axis=1)
    # Lagrangian ≥ t for every real x: [[const, q/2], [q/2, G − M]] ⪰ 0.
    q = c - m + E @ beta
    const = -t - cp.sum(beta)
    if caps:
        q = q + sum(mu[i] * w for i, (w, _) in enumerate(caps))
        const = const - sum(mu[i] * r for i, (_, r) in enumerate(caps))
    block = cp.bmat(
        [
            [cp.reshape(const, (1, 1), order="C"), cp.reshape(q / 2, (1, n), order="C")],
            [cp.reshape(q / 2, (n, 1), order="C"), G - M],
        ]
    )
    sdp = cp.Problem(cp.Maximize(t), [(block + block.T) / 2 >> 0])
    try:
        sdp.solve(solver="SCS", eps_abs=eps, eps_rel=eps, max_iters=max_iters)
    except cp.error.SolverError as err:
        log.info("QCR: SCS failed (%s); a plain diagonal shift instead", err)
        return None
    if v.value is None or A.value is None or not np.isfinite(sdp.value):
        log.info("QCR: SCS returned %s; a plain diagonal shift instead", sdp.status)
        return None
    Av = A.value
    Mv = (S @ v.value).reshape(n, n) + (Av @ E.T + (E @ Av.T)) / 2
    Q = G - Mv
    Q = (Q + Q.T) / 2
    cq = c + v.value[diag_k] + Av.sum(1)
    # Exactly PSD whatever SCS's accuracy: x_a² = x_a moves any remaining shift into the linear term.
    Q_psd, c_psd = shift_to_psd(Q, cq)
    log.info(
        "QCR: SDP bound %.6g (%s) in %.1f s, residual shift %.2e",
        sdp.value,
        sdp.status,
        time.perf_counter() - t0,
        cq[0] - c_psd[0],
    )
    return Q_psd, c_psd
