"""ACIQ analytical clipping (Banner et al. 2019) and GEMMLOWP-style affine unsigned qparams.

ACIQ picks the clipping value alpha that minimizes the expected quantization MSE of a tensor whose
values follow a Laplace(b) or Gaussian(sigma) prior, for any bit-width M:

    alpha = aciq_alpha(w, bits=4, prior="laplace", ch_axis=0)    # (C,) one alpha per channel
    lo, hi = aciq_range(x, bits=4, prior="gauss")                 # observer-ready min/max

The MSE is a closed form in alpha; alpha* is its stationary point, found by a sign scan of the
analytic derivative and Brent's method (no lookup table). Because the priors are scale families,
alpha* = c(M) * scale with c(M) computed once per (M, prior, one_sided, model) and cached.

Two MSE models:
- ``model="grid"`` (default): the MSE of the paper's quantizer with 2^M levels uniformly spanning
  [-alpha, alpha] (two-sided) or [0, alpha] (one-sided), round to nearest, values beyond the range
  clipped to the outermost level. For M <= 8 it is exact: a sum over the bins of closed-form partial
  moments of the prior. For M > 8 it is the high-resolution limit
  clip(alpha) + Delta^2/12 * P(|X| <= alpha) with Delta the grid step (it moves alpha* by less
  than 1e-4 relative at M = 8, less beyond).
- ``model="signed_grid"``: the grid :func:`mpqflow.quant.functional.choose_qparams` builds from the
  range [-alpha, alpha] (symmetric signed, and affine after rounding the zero point): levels
  k Delta, k = -2^(M-1) .. 2^(M-1) - 1, Delta = 2 alpha / (2^M - 1), i.e. [-alpha - Delta/2,
  alpha - Delta/2] with 0 exact. Same as "grid" for one-sided tensors (levels k alpha / (2^M - 1)).
  This is the model the ``aciq_*`` observers use for affine schemes: the quantizer then applied.
- ``model="narrow_grid"``: the grid of a symmetric signed scheme (the default, symmetric_range):
  2^M - 1 levels k Delta, |k| <= 2^(M-1) - 1, Delta = alpha / (2^(M-1) - 1), spanning exactly
  [-alpha, alpha] (2 bits: {-alpha, 0, alpha}).
- ``model="symmetric_grid"``: the same with symmetric_range false (torch's scale): the levels of
  "signed_grid" without -2^(M-1) Delta, Delta = 2 alpha / (2^M - 1), outermost ±(alpha - Delta/2).
  ``aciq_*`` observers of symmetric signed schemes read "signed_grid" as one of these two, the one
  applied. Both are the same as "grid" for one-sided tensors.
- ``model="banner"``: the paper's approximation, clip(alpha) + alpha^2 / (3 * 4^M) two-sided,
  clip(alpha) + alpha^2 / (12 * 4^M) one-sided (step alpha / 2^M). It ignores the within-bin shape
  of the density and the probability mass inside the range; its alpha* is 8-25% off the grid
  optimum at 2 bits (e.g. Laplace 2.83b vs 2.31b), which is why it is not the default.

Clipping terms (derived for unit scale, then MSE(alpha; s) = s^2 MSE(alpha / s; 1)):
- Laplace two-sided, density exp(-|x|/b)/(2b): 2 * int_alpha^inf (x-alpha)^2 f = 2 b^2 exp(-alpha/b).
- Gaussian two-sided: (alpha^2 + sigma^2) erfc(alpha/(sigma sqrt2))
  - sqrt(2/pi) alpha sigma exp(-alpha^2/(2 sigma^2)).
- One-sided (post-ReLU, x >= 0): the half distributions (exponential with mean b, half-normal with
  E[x^2] = sigma^2) have twice the density on one tail, so the clipping term is the same expression;
  only the grid changes (step alpha/(2^M - 1) instead of 2 alpha/(2^M - 1)).

The derivative used for the stationarity condition is, for the grid model,
dMSE/dalpha = -(2/alpha) E[(X - Q(X)) Q(X)] (the bin edges move but the error is continuous there).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy import optimize, special

from .functional import _reduce_dims, choose_qparams

__all__ = [
    "PRIORS",
    "MODELS",
    "aciq_mse",
    "aciq_mse_grad",
    "optimal_clip_ratio",
    "fit_prior",
    "aciq_alpha",
    "aciq_range",
    "moment_sums",
    "merge_sums",
    "aciq_range_from_sums",
    "gemmlowp_qparams",
]

PRIORS = ("laplace", "gauss")
MODELS = ("grid", "signed_grid", "symmetric_grid", "narrow_grid", "banner")
_EXACT_MAX_BITS = 8  # above this the grid model uses its high-resolution limit
_INF = 1e3  # stands in for +inf in unit-scale moments (exp(-1e3) == 0 in float64)
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


def _check(bits: int, prior: str, model: str, one_sided: bool = False) -> None:
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if not (isinstance(bits, (int, np.integer)) and 1 <= bits <= 16):
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")
    if model in ("signed_grid", "symmetric_grid", "narrow_grid") and bits == 1 and not one_sided:
        raise ValueError(f"{model}: a 1-bit signed grid has no symmetric range (levels {{-2 alpha, 0}})")


def _moments(prior: str, a: np.ndarray, b: np.ndarray):
    """Partial moments (m0, m1, m2) = int_a^b x^k f(x) dx of the unit half distribution on x >= 0.

    laplace: exponential, f = exp(-x); gauss: half-normal, f = 2 phi(x).
    """
    if prior == "laplace":
        ea, eb = np.exp(-a), np.exp(-b)
        return ea - eb, (a + 1) * ea - (b + 1) * eb, (a * a + 2 * a + 2) * ea - (b * b + 2 * b + 2) * eb
    pa, pb = np.exp(-a * a / 2) / _SQRT2PI, np.exp(-b * b / 2) / _SQRT2PI
    m0 = special.erfc(a / _SQRT2) - special.erfc(b / _SQRT2)
    return m0, 2 * (pa - pb), m0 + 2 * (a * pa - b * pb)


def _clip(prior: str, a):
    """Clipping MSE int_a^inf (x - a)^2 f(x) dx of the unit half distribution, and its derivative."""
    if prior == "laplace":
        e = np.exp(-a)
        return 2 * e, -2 * e
    ec, g = special.erfc(a / _SQRT2), np.exp(-a * a / 2) * math.sqrt(2 / math.pi)
    return (a * a + 1) * ec - a * g, 2 * a * ec - 2 * g


def _density(prior: str, a):
    """Unit half density f(a) and mass P(X <= a)."""
    if prior == "laplace":
        return np.exp(-a), -np.expm1(-a)
    return 2 * np.exp(-a * a / 2) / _SQRT2PI, special.erf(a / _SQRT2)


def _moments_two_sided(prior: str, a: np.ndarray, b: np.ndarray):
    """Partial moments of the unit two-sided density f(x) = f_half(|x|) / 2 on [a, b] (any signs)."""
    pos = _moments(prior, np.maximum(a, 0.0), np.maximum(b, 0.0))
    neg = _moments(prior, -np.minimum(b, 0.0), -np.minimum(a, 0.0))  # x = -y, y >= 0
    return tuple((p + (-1) ** k * q) / 2 for k, (p, q) in enumerate(zip(pos, neg)))


def _unit_levels(bits: int, one_sided: bool, model: str) -> tuple[np.ndarray, bool]:
    """Levels of the unit grid (alpha = 1) and whether they are the non-negative half of a grid
    symmetric about 0 (then the half distribution carries the whole MSE)."""
    n = 2**bits
    if one_sided:
        return np.linspace(0.0, 1.0, n), True
    if model == "signed_grid":
        return np.arange(-(n // 2), n // 2) * (2.0 / (n - 1)), False
    if model == "symmetric_grid":  # 0, D, ..., h D mirrored (D = 2 / (n - 1), h D = 1 - D / 2)
        return np.arange(n // 2) * (2.0 / (n - 1)), True
    if model == "narrow_grid":  # 0, 1/h, ..., 1 mirrored: 2^M - 1 levels
        h = n // 2 - 1
        return np.arange(h + 1) / h, True
    return (np.arange(n // 2) + 0.5) * (2.0 / (n - 1)), True


def _rel_step(bits: int, one_sided: bool, model: str) -> float:
    """Grid step divided by alpha."""
    width = 1.0 if one_sided else 2.0
    if model == "narrow_grid" and not one_sided:
        return width / (2**bits - 2)
    return width / (2**bits if model == "banner" else 2**bits - 1)


def _sides(bits: int, one_sided: bool, model: str) -> list[tuple[float, float]]:
    """(clip point / alpha, weight of the half distribution) of each clipped tail."""
    if model == "signed_grid" and not one_sided:  # outermost levels -alpha - D/2 and alpha - D/2
        d = 1.0 / (2**bits - 1)
        return [(1.0 - d, 0.5), (1.0 + d, 0.5)]
    if model == "symmetric_grid" and not one_sided:  # outermost levels ±(alpha - D/2)
        return [(1.0 - 1.0 / (2**bits - 1), 1.0)]
    return [(1.0, 1.0)]


def _unit_mse(a: float, bits: int, prior: str, one_sided: bool, model: str) -> tuple[float, float]:
    """(MSE, dMSE/dalpha) at unit scale."""
    if model != "banner" and bits <= _EXACT_MAX_BITS:
        lv, half = _unit_levels(bits, one_sided, model)
        lv = lv * a
        mid = (lv[1:] + lv[:-1]) / 2
        if half:
            edges = np.concatenate([[0.0], mid, [_INF]])
            m0, m1, m2 = _moments(prior, edges[:-1], edges[1:])
        else:
            edges = np.concatenate([[-_INF], mid, [_INF]])
            m0, m1, m2 = _moments_two_sided(prior, edges[:-1], edges[1:])
        mse = float(np.sum(m2 - 2 * lv * m1 + lv * lv * m0))
        return mse, float(-2.0 / a * np.sum(lv * (m1 - lv * m0)))
    c = _rel_step(bits, one_sided, model) ** 2 / 12
    if model == "banner":
        clip, dclip = _clip(prior, a)
        return float(clip + c * a * a), float(dclip + 2 * c * a)
    mse = grad = 0.0
    for u, w in _sides(bits, one_sided, model):  # high-resolution limit, one term per clipped tail
        clip, dclip = _clip(prior, u * a)
        f, p_in = _density(prior, u * a)
        mse += w * (clip + c * a * a * p_in)
        grad += w * (u * dclip + 2 * c * a * p_in + c * a * a * u * f)
    return float(mse), float(grad)


def aciq_mse(alpha, bits: int, prior: str = "laplace", scale=1.0, *, one_sided: bool = False, model: str = "grid"):
    """Expected quantization MSE E[(X - Q_alpha(X))^2] under the prior.

    Args:
        alpha: clipping value(s) (> 0), float or array.
        bits: bit-width M (2^M levels).
        prior: "laplace" (scale = b) or "gauss" (scale = sigma).
        scale: b or sigma, broadcast against alpha.
        one_sided: range [0, alpha] for non-negative tensors (half distributions).
        model: "grid" (2^M levels spanning the range, default), "signed_grid" (the two's-complement
            grid with 0 exact, as applied by affine schemes), "narrow_grid" (2^M - 1 levels spanning
            [-alpha, alpha], the default symmetric quantizer), "symmetric_grid" (signed_grid's levels
            without the lowest: symmetric_range false) or "banner" (the paper's approximation).
    """
    _check(bits, prior, model, one_sided)
    a, s = np.broadcast_arrays(np.asarray(alpha, float), np.asarray(scale, float))
    out = np.array(
        [s_**2 * _unit_mse(a_ / s_, bits, prior, one_sided, model)[0] for a_, s_ in zip(a.ravel(), s.ravel())]
    ).reshape(a.shape)
    return float(out) if out.ndim == 0 else out


def aciq_mse_grad(alpha, bits: int, prior: str = "laplace", scale=1.0, *, one_sided: bool = False, model: str = "grid"):
    """Derivative dMSE/dalpha of :func:`aciq_mse` (analytic). Same arguments."""
    _check(bits, prior, model, one_sided)
    a, s = np.broadcast_arrays(np.asarray(alpha, float), np.asarray(scale, float))
    out = np.array(
        [s_ * _unit_mse(a_ / s_, bits, prior, one_sided, model)[1] for a_, s_ in zip(a.ravel(), s.ravel())]
    ).reshape(a.shape)
    return float(out) if out.ndim == 0 else out


@functools.cache
def optimal_clip_ratio(bits: int, prior: str = "laplace", *, one_sided: bool = False, model: str = "grid") -> float:
    """alpha* / scale: the stationary point of the MSE with the lowest MSE (cached).

    Scans the analytic derivative on a log grid of alpha in [0.02, 60] (unit scale) for sign changes
    from - to +, then solves dMSE/dalpha = 0 with Brent's method in the best bracket.
    """
    _check(bits, prior, model, one_sided)
    grid = np.geomspace(0.02, 60.0, 400)
    vals = np.array([_unit_mse(a, bits, prior, one_sided, model) for a in grid])  # (400, 2)
    idx = np.flatnonzero((vals[:-1, 1] < 0) & (vals[1:, 1] >= 0))
    if idx.size == 0:
        raise RuntimeError(f"no stationary point of the ACIQ MSE for bits={bits}, prior={prior}")
    i = idx[np.argmin(vals[idx, 0])]
    fprime = lambda a: _unit_mse(a, bits, prior, one_sided, model)[1]  # noqa: E731
    return float(optimize.brentq(fprime, grid[i], grid[i + 1], xtol=1e-13, rtol=1e-13))


def fit_prior(
    x: torch.Tensor, prior: str = "laplace", *, one_sided: bool = False, ch_axis: int | None = None
) -> torch.Tensor:
    """Fit the prior's scale per tensor (0-dim result) or per channel along ch_axis (shape (C,)).

    Two-sided: b = mean |x - mean(x)| (laplace), sigma = std(x) (gauss).
    One-sided (x >= 0): the half distribution is fitted on the positive entries of x: b = mean(x),
    sigma = sqrt(mean(x^2)) (maximum likelihood of the exponential / half-normal). Exact zeros
    (the ReLU's mass at 0) are left out: they are represented exactly and scale the clipping and
    rounding terms alike, so they do not move alpha*.
    """
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    dims = _reduce_dims(x, ch_axis)
    x = x.detach().double()
    if one_sided:
        pos = (x > 0).double()
        n = pos.sum(dims).clamp_min(1)
        if prior == "laplace":
            return (x * pos).sum(dims) / n
        return ((x * x * pos).sum(dims) / n).sqrt()
    if prior == "laplace":
        return (x - x.mean(dims, keepdim=True)).abs().mean(dims)
    return x.std(dims, correction=0)


def aciq_alpha(
    x: torch.Tensor,
    bits: int | torch.Tensor,
    prior: str = "laplace",
    *,
    one_sided: bool | None = None,
    ch_axis: int | None = None,
    model: str = "grid",
) -> torch.Tensor:
    """ACIQ clipping value alpha* = c(M) * scale per tensor (0-dim) or per channel ((C,)).

    Args:
        x: the tensor (weights or calibration activations).
        bits: bit-width M, or a (C,) tensor of bit-widths per channel (with ch_axis).
        prior: "laplace" or "gauss".
        one_sided: range [0, alpha]; None decides from the data (True when x.min() >= 0).
        ch_axis: channel axis for per-channel statistics, None for per-tensor.
        model: MSE model, see the module docstring.
    """
    if one_sided is None:
        one_sided = bool(x.min() >= 0)
    scale = fit_prior(x, prior, one_sided=one_sided, ch_axis=ch_axis)
    if isinstance(bits, torch.Tensor) and bits.dim() > 0:  # (C,) bits per channel
        ratio = {int(b): optimal_clip_ratio(int(b), prior, one_sided=one_sided, model=model) for b in bits.unique()}
        return torch.tensor([ratio[int(b)] for b in bits], dtype=scale.dtype, device=scale.device) * scale
    return optimal_clip_ratio(int(bits), prior, one_sided=one_sided, model=model) * scale


def moment_sums(x: torch.Tensor, ch_axis: int | None = None) -> dict[str, torch.Tensor]:
    """Sufficient statistics of x for ACIQ, additive over batches (see :func:`merge_sums`).

    Keys (float64, 0-dim or (C,)): n, s1 = sum x, s2 = sum x^2, sabs = sum |x - batch mean|,
    n_pos, s1_pos, s2_pos (the same over x > 0), lo = min x, hi = max x.
    """
    dims = _reduce_dims(x, ch_axis)
    xd = x.detach().double()
    pos = (xd > 0).double()
    n = torch.full_like(xd.sum(dims), float(xd.numel() // max(1, xd.sum(dims).numel())))
    return dict(
        n=n,
        s1=xd.sum(dims),
        s2=(xd * xd).sum(dims),
        sabs=(xd - xd.mean(dims, keepdim=True)).abs().sum(dims),
        n_pos=pos.sum(dims),
        s1_pos=(xd * pos).sum(dims),
        s2_pos=(xd * xd * pos).sum(dims),
        lo=xd.amin(dims),
        hi=xd.amax(dims),
    )


def merge_sums(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Statistics of two batches together: sums add, lo/hi take min/max. (sabs is centered on each
    batch's own mean, so the pooled Laplace b is the count-weighted mean of the batches' b.)"""
    out = {k: a[k] + b[k] for k in a if k not in ("lo", "hi")}
    out["lo"], out["hi"] = torch.minimum(a["lo"], b["lo"]), torch.maximum(a["hi"], b["hi"])
    return out


def aciq_range_from_sums(
    sums: dict[str, torch.Tensor], bits: int | torch.Tensor, prior: str = "laplace", *, model: str = "grid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min_val, max_val) float64 from :func:`moment_sums`; see :func:`aciq_range`.

    One-sided when every observed value is >= 0 (fit on the positive entries), else two-sided
    (b = mean |x - mean|, sigma = std).
    """
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    one_sided = bool((sums["lo"] >= 0).all())
    if one_sided:
        n = sums["n_pos"].clamp_min(1)
        scale = sums["s1_pos"] / n if prior == "laplace" else (sums["s2_pos"] / n).sqrt()
    else:
        n = sums["n"].clamp_min(1)
        mean = sums["s1"] / n
        scale = sums["sabs"] / n if prior == "laplace" else (sums["s2"] / n - mean * mean).clamp_min(0).sqrt()
    if isinstance(bits, torch.Tensor) and bits.dim() > 0:  # (C,) bits per channel
        ratio = torch.tensor(
            [optimal_clip_ratio(int(b), prior, one_sided=one_sided, model=model) for b in bits],
            dtype=scale.dtype,
            device=scale.device,
        )
    else:
        ratio = optimal_clip_ratio(int(bits), prior, one_sided=one_sided, model=model)
    alpha = ratio * scale
    if one_sided:
        return torch.zeros_like(alpha), torch.minimum(alpha, sums["hi"])
    return torch.maximum(mean - alpha, sums["lo"]), torch.minimum(mean + alpha, sums["hi"])


def aciq_range(
    x: torch.Tensor,
    bits: int | torch.Tensor,
    prior: str = "laplace",
    *,
    ch_axis: int | None = None,
    model: str = "grid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Observer-ready (min_val, max_val) in x's dtype: [mean - alpha, mean + alpha] or [0, alpha].

    One-sided ([0, alpha], half-distribution fit) when x.min() >= 0. The range never extends beyond
    the observed data (clipping at alpha > max |x| would only add rounding noise), so
    min_val = max(mean - alpha, x.min()), max_val = min(mean + alpha, x.max()). Weights have
    mean ~ 0, which gives the paper's [-alpha, alpha]. bits may be a (C,) tensor (per channel).
    """
    lo, hi = aciq_range_from_sums(moment_sums(x, ch_axis), bits, prior, model=model)
    return lo.to(x.dtype), hi.to(x.dtype)


def gemmlowp_qparams(min_val, max_val, bits: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """GEMMLOWP-style affine unsigned qparams: (scale, zero_point, quant_min, quant_max).

    The integer range is [0, 2^M - 1]. The real range is first nudged to include 0
    (min <= 0 <= max), scale = (max - min) / (2^M - 1), and the zero point is the integer
    round(-min / scale) clamped to [0, 2^M - 1], so 0.0 maps exactly to an integer and back.
    This is :func:`mpqflow.quant.functional.choose_qparams` with symmetric=False, signed=False;
    apply with :func:`mpqflow.quant.functional.fake_quantize`. Per tensor (0-dim) or per channel ((C,)).

    Args:
        min_val, max_val: observed (or clipped, e.g. :func:`aciq_range`) range.
        bits: bit-width M.
    """
    return choose_qparams(min_val, max_val, bits, symmetric=False, signed=False)
