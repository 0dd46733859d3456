"""Per-channel bit allocation under an exact average-bit quota (Banner et al. 2019, section 4).

    bits = allocate_bits_aciq(w, avg_bits=4, prior="laplace", ch_axis=0)   # (C_out,) weights
    bits = allocate_bits_aciq(x, avg_bits=4, prior="laplace", ch_axis=1)   # (C,) activations
    bits = allocate_bits(alpha, avg_bits=3)                                # from ranges alone
    lo, hi = aciq_range(w, bits, "laplace", ch_axis=0, model="signed_grid")  # per-channel alpha*(M_c)
    w_q = fake_quantize_per_channel_bits(w, bits, lo, hi, ch_axis=0, symmetric=True, signed=True)

The paper minimizes sum_i alpha_i^2 / (3 B_i^2) (rounding noise of B_i = 2^{M_i} bins over
[-alpha_i, alpha_i]) subject to a fixed total number of bins sum_i B_i = C 2^M; the Lagrangian gives
B_i proportional to alpha_i^{2/3}. Here bits_i = log2(B_i) are rounded to integers in
[min_bits, max_bits] and re-targeted so that sum_i bits_i = C * avg_bits exactly, by greedy steps of
least marginal MSE (method="aciq"). method="optimal" continues with exchanges (one bit from the
channel that loses least to the channel that gains most) until none lowers the total MSE: for
per-channel MSEs convex in the bit-width (both models here) that is the integer optimum under the
bit quota, which differs from the bins-quota rule (bits_i - bits_j -> log2(alpha_i / alpha_j)
instead of 2/3 of it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .aciq import aciq_mse, fit_prior, optimal_clip_ratio
from .functional import choose_qparams, fake_quantize

__all__ = [
    "METHODS",
    "uniform_mse_fn",
    "aciq_mse_fn",
    "allocate_bits",
    "allocate_bits_aciq",
    "fake_quantize_per_channel_bits",
]

METHODS = ("aciq", "optimal")
MseFn = Callable[[int], np.ndarray]  # bits -> (C,) expected MSE of every channel at that bit-width


def uniform_mse_fn(alpha) -> MseFn:
    """Rounding-noise model without clipping: Delta_i^2 / 12 with Delta_i = 2 alpha_i / (2^M - 1)."""
    a2 = np.asarray(alpha, dtype=float) ** 2
    return lambda m: a2 / (3.0 * (2.0**m - 1) ** 2)


def aciq_mse_fn(scale, prior: str = "laplace", *, one_sided: bool = False) -> MseFn:
    """ACIQ model: each channel clipped at its alpha*(M); MSE_i(M) = scale_i^2 * MSE_unit(M)."""
    s2 = np.asarray(scale, dtype=float) ** 2

    def fn(m: int) -> np.ndarray:
        c = optimal_clip_ratio(int(m), prior, one_sided=one_sided)
        return s2 * aciq_mse(c, int(m), prior, 1.0, one_sided=one_sided)

    return fn


def _target(avg_bits: float, n: int, min_bits: int, max_bits: int) -> int:
    total = avg_bits * n
    if abs(total - round(total)) > 1e-9:
        raise ValueError(
            f"avg_bits={avg_bits} over {n} channels is {total} bits, not an integer: choose a multiple of 1/{n}"
        )
    if not min_bits <= avg_bits <= max_bits:
        raise ValueError(f"avg_bits={avg_bits} outside [{min_bits}, {max_bits}]")
    return int(round(total))


def allocate_bits(
    alpha, avg_bits: float, *, min_bits: int = 1, max_bits: int = 16, mse: MseFn | None = None, method: str = "aciq"
) -> torch.Tensor:
    """Integer bits per channel with mean exactly avg_bits.

    Args:
        alpha: (C,) clipping value (or range half-width) of each channel, > 0.
        avg_bits: target mean bit-width; avg_bits * C must be an integer.
        min_bits, max_bits: bounds of every channel's bit-width (1 <= min <= max <= 16).
        mse: bits -> (C,) per-channel expected MSE, used for the marginal steps; default
            :func:`uniform_mse_fn` (alpha).
        method: "aciq" (bins proportional to alpha^{2/3}, rounded, quota fixed greedily) or
            "optimal" (then exchanges to the integer optimum of the total MSE).
    Returns:
        (C,) int64 tensor of bit-widths.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 1 <= min_bits <= max_bits <= 16:
        raise ValueError(f"need 1 <= min_bits <= max_bits <= 16, got {min_bits}, {max_bits}")
    alpha = torch.as_tensor(alpha).detach().double().cpu().numpy().ravel()
    n = alpha.size
    target = _target(avg_bits, n, min_bits, max_bits)
    mse = mse or uniform_mse_fn(alpha)
    table = np.stack([mse(m) for m in range(min_bits, max_bits + 1)], axis=1)  # (C, K)
    w = np.maximum(alpha, np.finfo(float).tiny) ** (2.0 / 3.0)
    bits = np.log2(n * w / w.sum()) + avg_bits  # log2 of bins C 2^M w_i / sum w
    k = np.clip(np.rint(bits), min_bits, max_bits).astype(int) - min_bits  # (C,) column index
    k = _fix_total(table, k, target - n * min_bits)
    if method == "optimal":
        k = _exchange(table, k)
    return torch.from_numpy(k + min_bits).long()


def _gain_loss(table: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MSE decrease of one more bit, MSE increase of one bit less (inf where not allowed)."""
    rows, top = np.arange(k.size), table.shape[1] - 1
    gain = np.where(k < top, table[rows, k] - table[rows, np.minimum(k + 1, top)], -np.inf)
    loss = np.where(k > 0, table[rows, np.maximum(k - 1, 0)] - table[rows, k], np.inf)
    return gain, loss


def _fix_total(table: np.ndarray, k: np.ndarray, total: int) -> np.ndarray:
    k = k.copy()
    while k.sum() != total:
        gain, loss = _gain_loss(table, k)
        if k.sum() > total:
            k[np.argmin(loss)] -= 1
        else:
            k[np.argmax(gain)] += 1
    return k


def _exchange(table: np.ndarray, k: np.ndarray) -> np.ndarray:
    k = k.copy()
    for _ in range(k.size * table.shape[1]):
        gain, loss = _gain_loss(table, k)
        i = int(np.argmax(gain))
        loss[i] = np.inf
        j = int(np.argmin(loss))
        if not gain[i] > loss[j] * (1 + 1e-12):
            break
        k[i] += 1
        k[j] -= 1
    return k


def allocate_bits_aciq(
    x: torch.Tensor,
    avg_bits: float,
    prior: str = "laplace",
    *,
    ch_axis: int = 0,
    one_sided: bool | None = None,
    min_bits: int = 1,
    max_bits: int = 16,
    method: str = "aciq",
) -> torch.Tensor:
    """:func:`allocate_bits` with per-channel ACIQ statistics and the ACIQ MSE model.

    Weights: ch_axis=0 (output channels); activations (N, C, ...): ch_axis=1. alpha_i in the 2/3
    rule is the ACIQ clipping value at round(avg_bits); the marginal steps use each channel's
    clipped MSE at every bit-width.
    """
    if one_sided is None:
        one_sided = bool(x.min() >= 0)
    scale = fit_prior(x, prior, one_sided=one_sided, ch_axis=ch_axis).cpu().numpy()
    alpha = scale * optimal_clip_ratio(int(np.clip(round(avg_bits), 1, 16)), prior, one_sided=one_sided)
    return allocate_bits(
        alpha,
        avg_bits,
        min_bits=min_bits,
        max_bits=max_bits,
        mse=aciq_mse_fn(scale, prior, one_sided=one_sided),
        method=method,
    )


def fake_quantize_per_channel_bits(
    x: torch.Tensor,
    bits: torch.Tensor,
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    ch_axis: int,
    *,
    symmetric: bool,
    signed: bool,
    pow2_scale: bool = False,
    symmetric_range: bool = True,
) -> torch.Tensor:
    """Fake-quantize channel c of x at bits[c] with the qparams of [min_val[c], max_val[c]].

    Channels are grouped by bit-width; each group gets :func:`choose_qparams` and
    :func:`fake_quantize` of the core (a QParams has one integer range, so there is one per group).

    Args:
        x: tensor, C = x.shape[ch_axis].
        bits: (C,) integer bit-widths.
        min_val, max_val: (C,) ranges.
        ch_axis: channel axis.
        symmetric, signed, pow2_scale, symmetric_range: as in :func:`choose_qparams`.
    """
    ch_axis = ch_axis % x.dim()
    bits = torch.as_tensor(bits).reshape(-1).cpu()
    if bits.numel() != x.shape[ch_axis]:
        raise ValueError(f"{bits.numel()} bit-widths for {x.shape[ch_axis]} channels")
    out = torch.empty_like(x)
    for b in bits.unique().tolist():
        idx = torch.nonzero(bits == b).reshape(-1)
        scale, zp, qmin, qmax = choose_qparams(
            min_val.detach().cpu()[idx],
            max_val.detach().cpu()[idx],
            int(b),
            symmetric=symmetric,
            signed=signed,
            pow2_scale=pow2_scale,
            symmetric_range=symmetric_range,
        )
        idx = idx.to(x.device)
        part = fake_quantize(x.index_select(ch_axis, idx), scale.to(x.device), zp.to(x.device), qmin, qmax, ch_axis)
        out.index_copy_(ch_axis, idx, part)
    return out
