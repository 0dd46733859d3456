"""Bit-rate of quantized tensors: empirical Shannon entropy of their integer codes.

    h = entropy_bits(q)                 # bits per element of one tensor (one code book)
    h = entropy_bits(q, ch_axis=0)      # code book per output channel, averaged over elements
    h = mean_entropy_bits([q1, q2])     # element-weighted average over a model's tensors

H = -sum_k p_k log2 p_k with p_k the frequency of value k: the average length (bits per element)
an ideal entropy coder needs, a lower bound on the stored size next to the fixed-width bits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["entropy_bits", "mean_entropy_bits"]


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of a (R, K) count matrix."""
    p = counts.double() / counts.sum(-1, keepdim=True).clamp_min(1)
    return -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(-1)


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
    if ch_axis is None:
        _, counts = torch.unique(q.detach().reshape(-1), return_counts=True)
        return float(_entropy(counts[None])[0])
    rows = q.detach().movedim(ch_axis, 0).reshape(q.shape[ch_axis], -1)  # (C, K)
    _, inv = torch.unique(rows, return_inverse=True)  # symbol ids, (C, K)
    n_sym = int(inv.max()) + 1
    keys = inv + n_sym * torch.arange(rows.shape[0], device=rows.device)[:, None]
    counts = torch.bincount(keys.reshape(-1), minlength=rows.shape[0] * n_sym).view(rows.shape[0], n_sym)
    return float(_entropy(counts).mean())


def mean_entropy_bits(tensors: Iterable[torch.Tensor], ch_axis: int | None = None) -> float:
    """Element-weighted mean of :func:`entropy_bits` over tensors (e.g. all quantized weights)."""
    total, numel = 0.0, 0
    for q in tensors:
        total += entropy_bits(q, ch_axis) * q.numel()
        numel += q.numel()
    return total / numel if numel else 0.0
