"""The objective of a Problem in the forms the back-ends and the incumbent search take.

Usage:
    G = cross_layer_quadratic(problem)         # G with zero within-layer blocks (None if linear)
    is_psd(problem)                            # a PSD-projected method's G
    Q, c = convex_form(problem)                # Q = G + λI ⪰ 0, c = linear − λ (the diagonal shift)
    form = qcr_if_indefinite(problem, size_cap, bitops_cap, latency_cap)   # QCR of an indefinite G, else None

Every form has the problem's objective on every one-hot binary x.
"""

from __future__ import annotations

import functools

import numpy as np

from .problem import Problem
from .qcr import min_eigenvalue, qcr_form, shift_to_psd

__all__ = ["cross_layer_quadratic", "is_psd", "convex_form", "qcr_if_indefinite"]


@functools.lru_cache(maxsize=8)
def cross_layer_quadratic(problem: Problem) -> np.ndarray | None:
    """G with the within-layer blocks zeroed (they never contribute on one-hot x); None if linear.

    Cached (read-only) per problem: the incumbent search asks for it on every kick."""
    if problem.is_linear:
        return None
    G = np.array(problem.G)
    same = problem.layer_of[:, None] == problem.layer_of[None, :]
    G[same] = 0.0
    G.setflags(write=False)
    return G


def is_psd(problem: Problem) -> bool:
    """True if G is positive semidefinite up to rounding (a PSD-projected method's G)."""
    lam_min, tol = min_eigenvalue(problem.G)
    return lam_min >= -tol


def convex_form(problem: Problem) -> tuple[np.ndarray | None, np.ndarray]:
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


def qcr_if_indefinite(problem: Problem, size_cap, bitops_cap, latency_cap=None) -> tuple[np.ndarray, np.ndarray] | None:
    """The QCR form (qcr.py) of an indefinite G; None for a linear or PSD problem, or if SCS fails.
    A PSD G is left as it is: there the SDP costs more than it saves (bench/README.md)."""
    if problem.is_linear or is_psd(problem):
        return None
    return qcr_form(problem, size_cap, bitops_cap, latency_cap)
