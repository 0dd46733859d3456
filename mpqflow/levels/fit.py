"""Adaptive non-uniform quantization levels, ALQ and AMQ (Faghri et al. 2020).

A vector is cut into buckets; each coordinate becomes r = |v_i| / ||v_bucket|| in [0, 1] and is
rounded to a level of 0 = l_0 < l_1 < ... < l_{n-1} = 1; Q(v_i) = ||v_bucket|| sign(v_i) l(r).
Unbiased stochastic rounding sends r in [l_j, l_{j+1}] up with probability (r - l_j)/(l_{j+1} - l_j),
with variance (l_{j+1} - r)(r - l_j). The levels minimize its expectation
Psi(l) = sum_j int_{l_j}^{l_{j+1}} (l_{j+1} - r)(r - l_j) dP(r) under a truncated normal on [0, 1]
fitted to r (or the mixture of per-bucket fits weighted by ||v_bucket||^2, the weight each bucket
carries in E||Q(v) - v||^2).

    dist = fit_truncnorm(grad, bucket_size=8192)              # or mixture=True
    lv = alq_levels(dist, num_levels=8)                       # or amq_levels(dist, 8)[0]
    q = quantize_stochastic(grad, lv, 8192, generator=g)      # unbiased: E[q] = grad
    w_q = fake_quantize_levels(w, lv, ch_axis=0)              # weights: nearest level, per channel

This module fits the levels; applying them (bucket normalization, stochastic and nearest rounding:
quantize_stochastic, fake_quantize_levels above) is :mod:`.apply`.

ALQ: coordinate descent with the exact per-level minimizer. dPsi/dl_j = 0 gives
  F(l_j) = F(l_{j+1}) - int_{l_{j-1}}^{l_{j+1}} (r - l_{j-1}) / (l_{j+1} - l_{j-1}) dP(r),
(Psi is convex in l_j alone), solved by inverting the CDF F; levels with even and odd index are
updated in alternation (each half-sweep is exact block minimization). AMQ: exponential levels
l = (0, p^{n-2}, ..., p, 1), p fitted by gradient descent with backtracking. Both start from several
initializations and keep the lowest Psi.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg, special

from .apply import _check_levels, _rows, normalized_magnitudes

__all__ = [
    "TruncNormMixture",
    "levels_for_bits",
    "uniform_levels",
    "exponential_levels",
    "fit_truncnorm",
    "expected_variance",
    "expected_variance_grad",
    "amq_variance_and_grad",
    "alq_levels",
    "amq_levels",
    "fit_levels",
]

_MIN_SIGMA = 1e-6


@dataclass(frozen=True)
class TruncNormMixture:
    """Mixture of normals N(mu_k, sigma_k^2) truncated to [0, 1] with weights w_k (sum 1), (K,) each."""

    mu: np.ndarray
    sigma: np.ndarray
    weight: np.ndarray

    def __post_init__(self):
        if not (self.mu.shape == self.sigma.shape == self.weight.shape and self.mu.ndim == 1):
            raise ValueError("mu, sigma, weight must be 1-d arrays of equal length")
        if np.any(self.sigma <= 0) or abs(self.weight.sum() - 1) > 1e-9:
            raise ValueError("need sigma > 0 and weights summing to 1")

    def _z(self, x):  # (..., K)
        return (np.asarray(x, float)[..., None] - self.mu) / self.sigma

    @property
    def _mass(self):  # normalizer of each component on [0, 1]
        return special.ndtr((1 - self.mu) / self.sigma) - special.ndtr(-self.mu / self.sigma)

    def cdf(self, x):
        """P(r <= x) for x in [0, 1] (array)."""
        num = special.ndtr(self._z(x)) - special.ndtr(-self.mu / self.sigma)
        return (self.weight * num / self._mass).sum(-1)

    def moments(self, a, b):
        """Partial moments (m0, m1, m2) = int_a^b r^k dP(r), elementwise over arrays a <= b."""
        za, zb = self._z(a), self._z(b)
        pa, pb = np.exp(-za * za / 2), np.exp(-zb * zb / 2)
        pa, pb = pa / np.sqrt(2 * np.pi), pb / np.sqrt(2 * np.pi)
        P, dphi, dzphi = special.ndtr(zb) - special.ndtr(za), pa - pb, za * pa - zb * pb
        mu, s, c = self.mu, self.sigma, self.weight / self._mass
        m0 = (c * P).sum(-1)
        m1 = (c * (mu * P + s * dphi)).sum(-1)
        m2 = (c * ((mu * mu + s * s) * P + 2 * mu * s * dphi + s * s * dzphi)).sum(-1)
        return m0, m1, m2

    def pdf(self, x):
        """Density on [0, 1] (array)."""
        z = self._z(x)
        return (self.weight * np.exp(-z * z / 2) / (np.sqrt(2 * np.pi) * self.sigma * self._mass)).sum(-1)

    def ppf(self, q, lo, hi, x0=None, iters: int = 100):
        """Inverse CDF by safeguarded Newton inside brackets [lo, hi] (arrays) containing the root."""
        lo, hi, q = (np.array(t, float) for t in np.broadcast_arrays(lo, hi, q))
        x = (lo + hi) / 2 if x0 is None else np.clip(np.asarray(x0, float), lo, hi)
        for _ in range(iters):
            f = self.cdf(x) - q
            lo, hi = np.where(f < 0, x, lo), np.where(f < 0, hi, x)
            dens = self.pdf(x)
            with np.errstate(over="ignore"):
                step = np.where(dens > 0, f / np.where(dens > 0, dens, 1.0), np.inf)
            x_new = x - step
            x_new = np.where((x_new > lo) & (x_new < hi), x_new, (lo + hi) / 2)  # bisect if Newton leaves
            if np.all(np.abs(x_new - x) <= 1e-15 + 1e-13 * np.abs(x)):
                return x_new
            x = x_new
        return x


def levels_for_bits(bits: int) -> int:
    """Number of magnitude levels (0 and 1 included) of a signed M-bit code: 2^(M-1).

    Values {-l_{n-1}, ..., -l_1, 0, l_1, ..., l_{n-1}}: 2n - 1 = 2^M - 1 codes.
    """
    if bits < 2:
        raise ValueError("signed non-uniform levels need bits >= 2")
    return 2 ** (bits - 1)


def uniform_levels(num_levels: int) -> torch.Tensor:
    """(n,) levels 0, 1/(n-1), ..., 1 (QSGD)."""
    return torch.linspace(0, 1, num_levels, dtype=torch.float64)


def exponential_levels(num_levels: int, p: float) -> torch.Tensor:
    """(n,) levels 0, p^(n-2), ..., p, 1 (AMQ, NUQSGD for p = 1/2)."""
    return torch.cat(
        [torch.zeros(1, dtype=torch.float64), float(p) ** torch.arange(num_levels - 2, -1, -1, dtype=torch.float64)]
    )


def fit_truncnorm(v: torch.Tensor, bucket_size: int, *, norm: str = "l2", mixture: bool = False) -> TruncNormMixture:
    """Truncated normal(s) on [0, 1] fitted to the normalized magnitudes of v.

    Each bucket's coordinates are weighted by ||bucket||^2 (their weight in E||Q(v) - v||^2).
    mixture=False: one component with the weighted mean and std of all r (padding excluded).
    mixture=True: one component per non-zero bucket (its mean and std), weights ||bucket||^2.
    """
    r, nrm, numel = normalized_magnitudes(v.detach().cpu(), bucket_size, norm)  # fitting runs on CPU
    r = r.double()
    valid = (torch.arange(r.numel()) < numel).view_as(r).double()  # (B, d) not padding
    w = (nrm.double() ** 2)[:, None] * valid
    keep = nrm > 0
    if not torch.any(keep):
        raise ValueError("cannot fit levels to an all-zero tensor")
    if mixture:
        n = valid.sum(1)
        mu = (r * valid).sum(1) / n
        sd = (((r - mu[:, None]) ** 2 * valid).sum(1) / n).sqrt()
        wt = nrm.double() ** 2
        mu, sd, wt = mu[keep], sd[keep], wt[keep]
    else:
        mu = (w * r).sum() / w.sum()
        sd = ((w * (r - mu) ** 2).sum() / w.sum()).sqrt()
        mu, sd, wt = mu[None], sd[None], torch.ones(1, dtype=torch.float64)
    return TruncNormMixture(mu.numpy(), np.maximum(sd.numpy(), _MIN_SIGMA), (wt / wt.sum()).numpy())


def expected_variance(levels, dist: TruncNormMixture) -> float:
    """Psi(l) = E[(l_{j+1} - r)(r - l_j)] for r ~ dist: normalized variance of stochastic rounding."""
    lv = _check_levels(levels)
    lo, hi = lv[:-1], lv[1:]
    m0, m1, m2 = dist.moments(lo, hi)
    return float(np.sum(-m2 + (lo + hi) * m1 - lo * hi * m0))


def _grad(lv: np.ndarray, dist: TruncNormMixture) -> np.ndarray:
    m0, m1, _ = dist.moments(lv[:-1], lv[1:])  # per interval j: [l_j, l_{j+1}]
    below = m1[:-1] - lv[:-2] * m0[:-1]  # int_{l_{j-1}}^{l_j} (r - l_{j-1}) dP
    above = lv[2:] * m0[1:] - m1[1:]  # int_{l_j}^{l_{j+1}} (l_{j+1} - r) dP
    return below - above  # (n-2,) interior levels


def expected_variance_grad(levels, dist: TruncNormMixture) -> np.ndarray:
    """dPsi/dl_j for the interior levels j = 1..n-2 ((n-2,) array)."""
    return _grad(_check_levels(levels), dist)


def amq_variance_and_grad(p: float, dist: TruncNormMixture, num_levels: int) -> tuple[float, float]:
    """Psi of the exponential levels (0, p^(n-2), ..., p, 1) and dPsi/dp (chain rule over levels)."""
    lv = exponential_levels(num_levels, p).numpy()
    k = np.arange(num_levels - 2, 0, -1)  # exponents of the interior levels l_1..l_{n-2}
    dl = k * float(p) ** (k - 1)
    return expected_variance(lv, dist), float(np.dot(_grad(lv, dist), dl))


def _cd_sweep(lv: np.ndarray, dist: TruncNormMixture) -> np.ndarray:
    """One sweep of exact coordinate minimization: odd-index levels, then even-index levels."""
    for parity in (1, 2):
        lv = lv.copy()
        j = np.arange(parity, lv.size - 1, 2)
        a, b = lv[j - 1], lv[j + 1]  # b > a: levels are kept strictly increasing
        m0, m1, _ = dist.moments(a, b)
        target = dist.cdf(b) - (m1 - a * m0) / (b - a)
        # no mass between the neighbours: Psi does not depend on l_j, keep it at the midpoint
        lv[j] = np.where(m0 > 0, dist.ppf(target, a, b, x0=lv[j]), (a + b) / 2)
        lv = _strict(lv)
    return lv


def _newton_step(lv: np.ndarray, dist: TruncNormMixture) -> np.ndarray | None:
    """Newton step on Psi with its tridiagonal Hessian; None unless it lowers Psi keeping the order.

    d2Psi/dl_j^2 = (l_{j+1} - l_{j-1}) p(l_j), d2Psi/dl_j dl_{j+1} = -P(l_j < r < l_{j+1}).
    """
    g = _grad(lv, dist)
    diag = (lv[2:] - lv[:-2]) * dist.pdf(lv[1:-1])
    diag = np.maximum(diag, 1e-9 * diag.max())  # levels in empty regions: no curvature, no move
    off = -dist.moments(lv[1:-2], lv[2:-1])[0]
    ab = np.zeros((3, diag.size))
    ab[0, 1:], ab[1], ab[2, :-1] = off, diag, off
    try:
        step = linalg.solve_banded((1, 1), ab, -g)
    except (linalg.LinAlgError, ValueError):
        return None
    if not np.all(np.isfinite(step)) or np.dot(step, g) >= 0:
        return None  # not a descent direction (Hessian not positive definite here)
    f0 = expected_variance(lv, dist)
    t = 1.0
    for _ in range(30):
        new = lv.copy()
        new[1:-1] += t * step
        if np.all(np.diff(new) > 0) and expected_variance(new, dist) <= f0 + 1e-4 * t * np.dot(step, g):
            return new
        t /= 2
    return None


def _alq_descent(lv: np.ndarray, dist: TruncNormMixture, iters: int, tol: float) -> np.ndarray:
    """Coordinate descent until Psi stalls (relative decrease < tol per sweep); after a few sweeps
    each round also tries a Newton step, which removes the slow (Gauss-Seidel-like) tail of
    coordinate descent when there are many levels."""
    f = expected_variance(lv, dist)
    for k in range(iters):
        lv = _cd_sweep(lv, dist)
        if k >= 5:
            polished = _newton_step(lv, dist)
            lv = lv if polished is None else polished
        f, f_old = expected_variance(lv, dist), f
        if f_old - f <= tol * f:
            break
    return lv


def _quantile_levels(dist: TruncNormMixture, n: int) -> np.ndarray:
    q = np.arange(1, n - 1) / (n - 1)
    return np.concatenate([[0.0], dist.ppf(q, np.zeros(n - 2), np.ones(n - 2)), [1.0]])


def _strict(lv: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Project onto strictly increasing levels 0 = l_0 < ... < l_{n-1} = 1 (gaps >= eps): ties can
    come from the CDF inversion where the distribution has no mass."""
    shift = eps * np.arange(lv.size)
    # l_i in [i eps, 1 - (n-1-i) eps] first: a running max then never lifts the top level above 1
    y = np.clip(lv, shift, 1.0 - shift[::-1])
    y[0], y[-1] = 0.0, 1.0
    y = np.maximum.accumulate(y - shift) + shift  # y_i - i eps non-decreasing <=> gaps >= eps
    y[-1] = 1.0  # exactly, whatever (1 - k eps) + k eps rounds to
    return y


def alq_levels(dist: TruncNormMixture, num_levels: int, *, iters: int = 500, tol: float = 1e-13) -> torch.Tensor:
    """ALQ levels: coordinate descent from uniform, exponential (p = 1/2, AMQ's p) and quantile starts.

    Every start gets 20 sweeps; the one with the lowest expected variance continues until Psi stalls
    (relative decrease below tol per sweep) or iters sweeps. Different starts do end at different
    stationary points: levels in regions without mass have zero gradient, so a uniform start with
    L2-normalized buckets keeps most levels where no coordinate lies. Returns (n,) float64 levels.
    """
    if num_levels <= 2:
        return uniform_levels(max(num_levels, 2))
    starts = [
        uniform_levels(num_levels).numpy(),
        exponential_levels(num_levels, 0.5).numpy(),
        amq_levels(dist, num_levels)[0].numpy(),
        _quantile_levels(dist, num_levels),
    ]
    warm = [_alq_descent(_strict(s), dist, min(iters, 20), tol) for s in starts]
    best = min(warm, key=lambda lv: expected_variance(lv, dist))  # only the best start is finished
    return torch.from_numpy(_alq_descent(best, dist, iters, tol))


def amq_levels(
    dist: TruncNormMixture, num_levels: int, *, p_inits=(0.2, 0.4, 0.6, 0.8), iters: int = 200, tol: float = 1e-10
) -> tuple[torch.Tensor, float]:
    """AMQ: (levels, p) with levels (0, p^(n-2), ..., p, 1) and p in (0, 1) by gradient descent.

    Steps are p <- clip(p - t dPsi/dp) with backtracking (Armijo) on t; several initial p, the lowest
    Psi is kept.
    """
    if num_levels <= 2:
        return uniform_levels(max(num_levels, 2)), 0.5
    lo, hi = 1e-6, 1 - 1e-6
    best = (np.inf, 0.5)
    for p in p_inits:
        f, g = amq_variance_and_grad(p, dist, num_levels)
        t = 1.0 / max(abs(g), 1e-300) * 0.1  # first step moves p by at most 0.1
        for _ in range(iters):
            while True:
                p_new = float(np.clip(p - t * g, lo, hi))
                f_new, g_new = amq_variance_and_grad(p_new, dist, num_levels)
                if f_new <= f - 1e-4 * g * (p - p_new) or abs(p_new - p) < tol:
                    break
                t /= 2
            done = abs(p_new - p) < tol
            p, f, g, t = p_new, f_new, g_new, t * 2
            if done:
                break
        best = min(best, (f, p))
    return exponential_levels(num_levels, best[1]), best[1]


def fit_levels(
    x: torch.Tensor,
    num_levels: int,
    method: str = "alq",
    *,
    bucket_size: int | None = None,
    ch_axis: int | None = None,
    norm: str = "linf",
    mixture: bool = False,
) -> torch.Tensor:
    """Levels for x: "uniform", "alq" or "amq". Buckets are channels along ch_axis, or flat buckets
    of bucket_size, or the whole tensor."""
    if method == "uniform":
        return uniform_levels(num_levels)
    if method not in ("alq", "amq"):
        raise ValueError(f"method must be 'uniform', 'alq' or 'amq', got {method!r}")
    rows, d = _rows(x, bucket_size, ch_axis)
    dist = fit_truncnorm(rows, d, norm=norm, mixture=mixture)
    return alq_levels(dist, num_levels) if method == "alq" else amq_levels(dist, num_levels)[0]
