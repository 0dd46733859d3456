"""Gradient codes for the wire: bucket norms plus one `bits`-bit code per coordinate, packed.

Usage:
    codes, norms = encode(grad, levels, bucket_size=512, generator=g)   # (numel,) int64, (B,) float
    packed = pack_codes(codes, bits=3)                                   # (ceil(numel * 3 / 8),) uint8
    back = decode(unpack_codes(packed, 3, grad.numel()), norms, levels, 512)   # E[back] = grad

A coordinate v_i of bucket b is r = |v_i| / ||v_b|| in [0, 1], rounded unbiasedly onto one of the
n = 2^(bits-1) levels 0 = l_0 < ... < l_{n-1} = 1 (up with probability (r - l_j)/(l_{j+1} - l_j)),
and sent as code = j + n * [v_i < 0]: 2n = 2^bits codes, the sign in the top bit. decode gives
||v_b|| * sign * l_j, so E[decode(encode(v))] = v (QSGD, NUQSGD, ALQ and AMQ differ only in the levels).
"""

from __future__ import annotations

import torch

from ..levels.apply import normalized_magnitudes

__all__ = ["encode", "encode_with_variance", "decode", "pack_codes", "unpack_codes", "packed_bytes"]


def _levels(levels, device) -> torch.Tensor:
    lv = torch.as_tensor(levels, dtype=torch.float64, device=device)
    if lv.ndim != 1 or lv.numel() < 2 or lv[0] != 0 or lv[-1] != 1 or bool((lv.diff() <= 0).any()):
        raise ValueError("levels must be strictly increasing from 0 to 1")
    return lv


def encode(
    v: torch.Tensor, levels, bucket_size: int, generator: torch.Generator | None = None, *, norm: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (numel,) int64 in [0, 2n), norms (B,) float32) of v's unbiased stochastic quantization."""
    codes, norms, _ = encode_with_variance(v, levels, bucket_size, generator, norm=norm)
    return codes, norms


def encode_with_variance(
    v: torch.Tensor, levels, bucket_size: int, generator: torch.Generator | None = None, *, norm: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`encode` and the exact E||decode(encode(v)) - v||^2 over the rounding draws:
    sum over coordinates of ||v_b||^2 (l_{j+1} - r)(r - l_j) (no sampling; what ALQ/AMQ minimise)."""
    lv = _levels(levels, v.device)
    r, norms, numel = normalized_magnitudes(v.double(), bucket_size, norm)  # (B, d), (B,)
    r = r.clamp(0, 1)
    j = torch.clamp(torch.searchsorted(lv, r.contiguous(), right=True) - 1, 0, lv.numel() - 2)  # (B, d)
    lo, hi = lv[j], lv[j + 1]
    variance = float((norms[:, None] ** 2 * (hi - r) * (r - lo)).sum())
    r, j, lo, hi = (t.reshape(-1)[:numel] for t in (r, j, lo, hi))  # drop the padding
    up = torch.rand(r.shape, generator=generator, dtype=r.dtype, device=r.device) < (r - lo) / (hi - lo)
    negative = v.reshape(-1) < 0
    return (j + up.long()) + lv.numel() * negative.long(), norms.float(), variance


def decode(codes: torch.Tensor, norms: torch.Tensor, levels, bucket_size: int) -> torch.Tensor:
    """(numel,) float32: ||bucket|| * sign * level of each code (the inverse of :func:`encode`)."""
    lv = _levels(levels, codes.device)
    n = lv.numel()
    magnitude = lv[codes % n]
    sign = 1.0 - 2.0 * (codes >= n).double()
    bucket_norm = norms.double().repeat_interleave(bucket_size)[: codes.numel()]
    return (bucket_norm * sign * magnitude).float()


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of `numel` codes of `bits` bits packed back to back."""
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(packed_bytes,) uint8: the codes' `bits` low bits, back to back (little-endian within a byte)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) to fit {bits} bits")
    shifts = torch.arange(bits, device=codes.device)
    stream = ((codes.reshape(-1, 1) >> shifts) & 1).reshape(-1).to(torch.uint8)  # (numel * bits,)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)  # (bytes, 8)
    weights = (2 ** torch.arange(8, device=codes.device)).to(torch.uint8)
    return (stream * weights).sum(dim=1, dtype=torch.int64).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """(numel,) int64: the inverse of :func:`pack_codes`."""
    if packed.numel() != packed_bytes(numel, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {numel} codes of {bits} bits")
    stream = ((packed.long().reshape(-1, 1) >> torch.arange(8, device=packed.device)) & 1).reshape(-1)
    per_code = stream[: numel * bits].view(numel, bits)  # (numel, bits)
    return (per_code << torch.arange(bits, device=packed.device)).sum(dim=1)
