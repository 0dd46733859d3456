"""Bit-rate of quantized tensors: empirical Shannon entropy of their integer codes.

    h = entropy_bits(q)                 # bits per element of one tensor (one code book)
    h = entropy_bits(q, ch_axis=0)      # code book per output channel, averaged over elements
    h = mean_entropy_bits([q1, q2])     # element-weighted average over a model's tensors

H = -sum_k p_k log2 p_k with p_k the frequency of value k: the average length (bits per element)
an ideal entropy coder needs, a lower bound on the stored size next to the fixed-width bits.

Cost: O(numel) memory, and O(numel) time for values on per-channel uniform grids (what fake
quantization makes). Each channel's values get integer codes k = round((v - lo) / step), lo the
channel's minimum and step the smallest gap in a sample of its values: the grid of a fake-quantized
channel, whatever its scale and zero point. A (channel, code) count table of channels x (most codes
in one channel) <= numel entries counts them. The codes are exact, not assumed: equal values get
equal codes (correctly rounded elementwise ops), and writing one value per code and reading it back
for every element proves that each code holds one value. Channels off a uniform grid (non-uniform
levels that the grid does not separate, NaN/inf, a grid finer than the sample showed) are counted by
sorting them instead, O(K log K) each. Channels go through in blocks of about _BLOCK elements, so
temporaries stay small and reuse memory (the tensor is never copied whole).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["entropy_bits", "mean_entropy_bits"]

_SAMPLE = 128  # values per channel the grid step is read from
_BLOCK = 1 << 20  # elements per block of channels


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of a (R, K) count matrix."""
    p = counts.double() / counts.sum(-1, keepdim=True).clamp_min(1)
    return -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(-1)


def _count_codes(codes: torch.Tensor, n: int) -> torch.Tensor:
    """(C, n) int64 counts of the codes 0..n-1 in each row of (C, K) int64 codes."""
    ones = torch.ones((), dtype=torch.long, device=codes.device).expand(codes.shape)
    return torch.zeros(codes.shape[0], n, dtype=torch.long, device=codes.device).scatter_add_(1, codes, ones)


def _sorted_counts(rows: torch.Tensor) -> torch.Tensor:
    """(C, D) counts of each row's distinct values in ascending order (D: most distinct values in a row).

    Any values (the fallback): the k-th distinct value of a sorted row gets code k.
    """
    s = torch.sort(rows, dim=1).values  # (C, K)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]  # first element of each run of equal values
    codes = new.cumsum(1) - 1  # (C, K) code of each element in its row's code book
    return _count_codes(codes, int(codes[:, -1].max()) + 1)


def _grid_counts(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of rows on a uniform grid: ((C', n) counts in ascending value order, (C,) bool rows counted).

    Codes k = round((v - lo) / step). A row is counted when its grid has at most K points and every
    code holds a single value (scatter one value per code, gather it back, compare).
    """
    K = rows.shape[1]
    v = rows.double() if not rows.is_floating_point() or rows.dtype == torch.float64 else rows.float()  # (C, K)
    lo, hi = torch.aminmax(v, dim=1)  # (C,)
    gaps = torch.sort(v[:, :: max(1, K // _SAMPLE)], dim=1).values.diff(dim=1)  # (C, ~_SAMPLE - 1)
    step = gaps.masked_fill_(gaps == 0, torch.inf).amin(1) if gaps.shape[1] else torch.full_like(lo, torch.inf)
    span = (hi - lo) / step  # highest code (0 if constant, inf if a sample is constant; nan if not finite)
    ok = torch.isfinite(span) & (span <= K - 1)
    if not bool(ok.any()):
        return torch.zeros(0, 1, dtype=torch.long, device=rows.device), ok
    if not bool(ok.all()):
        rows, v, lo, step = rows[ok], v[ok], lo[ok], step[ok]
    codes = (v - lo[:, None]).div_(step[:, None]).round_().long()  # (C', K): same value -> same code
    n = int(codes.amax()) + 1
    one = torch.empty(codes.shape[0], n, dtype=rows.dtype, device=rows.device).scatter_(1, codes, rows)
    back = torch.gather(one, 1, codes)  # (C', K) the value each code holds
    counts = _count_codes(codes, n)
    if not torch.equal(back, rows):  # some code holds two values: not these rows
        single = (back == rows).all(1)
        ok[ok.clone()] = single
        counts = counts[single]
    return counts, ok


def _row_entropy(rows: torch.Tensor) -> torch.Tensor:
    """(C,) entropy in bits of each row of (C, K) values: grid codes where exact, else sorting."""
    counts, ok = _grid_counts(rows)
    if bool(ok.all()):
        return _entropy(counts)
    h = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
    h[ok] = _entropy(counts)
    h[~ok] = _entropy(_sorted_counts(rows[~ok]))
    return h


def entropy_bits(q: torch.Tensor, ch_axis: int | None = None) -> float:
    """Average entropy in bits per element of the values of q (integer codes or fake-quant values).

    Args:
        q: quantized tensor.
        ch_axis: None for one distribution over the whole tensor; an axis for one distribution per
            channel (codes of different channels are different symbols), averaged over channels
            weighted by their element counts (equal here).
    """
    if q.numel() == 0:
        return 0.0
    q = q.detach()
    q = q.to(torch.uint8) if q.dtype == torch.bool else q
    q, axis = (q.reshape(1, -1), 0) if ch_axis is None else (q, ch_axis)
    C, K = q.shape[axis], q.numel() // q.shape[axis]
    block = max(1, _BLOCK // K)  # channels per block
    h = [
        _row_entropy(q.narrow(axis, c, min(block, C - c)).movedim(axis, 0).reshape(-1, K).contiguous())
        for c in range(0, C, block)
    ]  # (C,) in blocks of (block, K) rows
    return float(torch.cat(h).mean())


def mean_entropy_bits(tensors: Iterable[torch.Tensor], ch_axis: int | None = None) -> float:
    """Element-weighted mean of :func:`entropy_bits` over tensors (e.g. all quantized weights)."""
    total, numel = 0.0, 0
    for q in tensors:
        total += entropy_bits(q, ch_axis) * q.numel()
        numel += q.numel()
    return total / numel if numel else 0.0
