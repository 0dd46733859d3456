"""How a method forms its objective matrix from a measured G; the solve is exact for whatever it gets.

Usage:
    G_psd = psd_project(G)          # clado: nearest PSD matrix (Frobenius), negative eigenvalues -> 0
    G_diag = diagonal(G)            # clado_naive / zeroq: the independent (diagonal) model
    G_raw = raw(G)                  # clado_raw: as measured (symmetrized)
    estimated_loss_increase(problem_or_G, x)   # x^T G x / 2 (+ linear . x / 2)

CLADO's G holds twice the loss Hessian-like terms (G[i,i] = 2(L(i) - L0),
G[i,j] = L(i,j) - L(i) - L(j) + L0), so x^T G x is twice the estimated loss increase.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OBJECTIVES", "psd_project", "diagonal", "raw", "form_objective", "estimated_loss_increase"]


def _sym(G) -> np.ndarray:
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be square, got shape {G.shape}")
    return (G + G.T) / 2


def psd_project(G) -> np.ndarray:
    """Nearest PSD matrix in Frobenius norm: V max(Lambda, 0) V^T of the symmetrized G (symmetrized)."""
    lam, V = np.linalg.eigh(_sym(G))                  # (n,), (n, n)
    P = (V * np.clip(lam, 0.0, None)) @ V.T
    return (P + P.T) / 2


def diagonal(G) -> np.ndarray:
    """The diagonal of G as a matrix (no cross-layer interactions)."""
    return np.diag(np.diag(np.asarray(G, dtype=np.float64)))


def raw(G) -> np.ndarray:
    """G as measured, symmetrized."""
    return _sym(G)


OBJECTIVES = {"psd": psd_project, "diagonal": diagonal, "raw": raw}


def form_objective(G, how: str) -> np.ndarray:
    """Apply one of OBJECTIVES ("psd", "diagonal", "raw") to G."""
    if how not in OBJECTIVES:
        raise ValueError(f"unknown objective form {how!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[how](G)


def estimated_loss_increase(problem_or_G, x) -> float:
    """Estimated loss increase of decision x: (x^T G x + linear . x) / 2.

    Args:
        problem_or_G: a Problem (its G and linear are used) or an (n, n) matrix G.
        x: (n,) 0/1 decision.
    """
    x = np.asarray(x, dtype=np.float64)
    if hasattr(problem_or_G, "objective"):
        return problem_or_G.objective(x) / 2
    G = np.asarray(problem_or_G, dtype=np.float64)
    return float(x @ G @ x) / 2
