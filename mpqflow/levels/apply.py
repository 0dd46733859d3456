"""Quantization onto given non-uniform levels (ALQ/AMQ, Faghri et al. 2020; fitted in :mod:`.fit`).

A vector is cut into buckets (or rows: channels along ch_axis); each coordinate becomes
r = |v_i| / ||v_bucket|| in [0, 1] and is rounded to a level of 0 = l_0 < l_1 < ... < l_{n-1} = 1;
Q(v_i) = ||v_bucket|| sign(v_i) l(r). Unbiased stochastic rounding sends r in [l_j, l_{j+1}] up with
probability (r - l_j)/(l_{j+1} - l_j); deterministic rounding takes the nearest level.

    q = quantize_stochastic(grad, lv, 8192, generator=g)      # unbiased: E[q] = grad
    w_q = fake_quantize_levels(w, lv, ch_axis=0)              # weights: nearest level, per channel
    r, norms, numel = normalized_magnitudes(grad, 8192)       # the r the levels are fitted to
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["normalized_magnitudes", "quantize_stochastic", "fake_quantize_levels"]


def _check_levels(levels) -> np.ndarray:
    lv = torch.as_tensor(levels).detach().double().cpu().numpy()
    if lv.ndim != 1 or lv.size < 2 or lv[0] != 0 or lv[-1] != 1 or np.any(np.diff(lv) <= 0):
        raise ValueError("levels must be strictly increasing from 0 to 1")
    return lv


def _buckets(v: torch.Tensor, bucket_size: int) -> torch.Tensor:
    flat = v.reshape(-1)
    pad = (-flat.numel()) % bucket_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, bucket_size)  # (B, d), zero-padded


def _norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "l2":
        return x.norm(dim=1)
    if norm == "linf":
        return x.abs().amax(dim=1)
    raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")


def normalized_magnitudes(
    v: torch.Tensor, bucket_size: int, norm: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(r, norms, numel): r = |v| / ||bucket|| as (B, d) (zero-padded), norms (B,), v.numel()."""
    b = _buckets(v.detach(), bucket_size)
    nrm = _norm(b, norm)
    r = b.abs() / torch.where(nrm > 0, nrm, torch.ones_like(nrm))[:, None]
    return r, nrm, v.numel()


def _rows(x: torch.Tensor, bucket_size: int | None, ch_axis: int | None) -> tuple[torch.Tensor, int]:
    if ch_axis is not None:
        rows = x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)  # (C, K)
        return rows, rows.shape[1]
    d = bucket_size or x.numel()
    return x, d


def _round(r: torch.Tensor, lv: torch.Tensor, stochastic: bool, generator) -> torch.Tensor:
    j = torch.clamp(torch.searchsorted(lv, r.contiguous(), right=True) - 1, 0, lv.numel() - 2)
    lo, hi = lv[j], lv[j + 1]
    frac = (r - lo) / (hi - lo)
    if stochastic:
        up = torch.rand(r.shape, generator=generator, dtype=r.dtype, device=r.device) < frac
    else:
        up = frac > 0.5
    return torch.where(up, hi, lo)


def quantize_stochastic(
    v: torch.Tensor, levels, bucket_size: int, generator: torch.Generator | None = None, *, norm: str = "l2"
) -> torch.Tensor:
    """Unbiased stochastic quantization of v onto ||bucket|| * sign * levels; E[Q(v)] = v.

    Args:
        v: any shape (e.g. a gradient); flattened into buckets of bucket_size (last one zero-padded).
        levels: (n,) increasing from 0 to 1.
        bucket_size: coordinates per bucket.
        generator: torch.Generator for the rounding draws (reproducibility).
        norm: "l2" (ALQ/QSGD) or "linf" bucket normalization.
    """
    _check_levels(levels)
    b = _buckets(v.detach(), bucket_size).double()  # (B, d)
    nrm = _norm(b, norm)
    r = b.abs() / torch.where(nrm > 0, nrm, torch.ones_like(nrm))[:, None]
    lv = torch.as_tensor(levels, dtype=torch.float64, device=v.device)
    q = nrm[:, None] * torch.sign(b) * _round(r.clamp(0, 1), lv, True, generator)
    return q.reshape(-1)[: v.numel()].view_as(v).to(v.dtype)


def fake_quantize_levels(x: torch.Tensor, levels, *, ch_axis: int | None = None, norm: str = "linf") -> torch.Tensor:
    """Deterministic (nearest-level) quantization onto ||row|| * sign * levels; rows are channels
    along ch_axis or the whole tensor. With norm="linf" each row's largest magnitude is kept exactly.
    At most 2n - 1 distinct values per row for n levels."""
    _check_levels(levels)
    rows, _ = _rows(x.detach(), None, ch_axis)
    rows = rows.reshape(1, -1) if ch_axis is None else rows
    rows = rows.double()
    nrm = _norm(rows, norm)
    r = rows.abs() / torch.where(nrm > 0, nrm, torch.ones_like(nrm))[:, None]
    lv = torch.as_tensor(levels, dtype=torch.float64, device=x.device)
    q = nrm[:, None] * torch.sign(rows) * _round(r.clamp(0, 1), lv, False, None)
    if ch_axis is None:
        return q.view_as(x).to(x.dtype)
    shape = list(x.movedim(ch_axis, 0).shape)
    return q.view(shape).movedim(0, ch_axis).to(x.dtype)
