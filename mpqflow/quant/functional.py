"""Stateless quantization core: integer ranges, qparams from a real range, fake quantization, MSE.

    qmin, qmax = quant_range(4, signed=True)                             # (-8, 7)
    scale, zp, qmin, qmax = choose_qparams(lo, hi, 4, symmetric=True, signed=True)  # (amax / 7, 0, -7, 7)
    w_q = fake_quantize(w, scale, zp, qmin, qmax, ch_axis=0)             # per output channel
    lo, hi = mse_clip_range(w, 4, symmetric=True, signed=True, ch_axis=0)  # MSE-optimal clipping

Uniform affine quantization with integer range [quant_min, quant_max]:

    Q(x) = (clamp(round(x / scale) + zero_point, quant_min, quant_max) - zero_point) * scale

(round half to even, as torch.fake_quantize_* does). Symmetric signed grids never put a range's
extreme on a rounding tie between two levels. torch's convention (scale = amax / 127.5 at 8 bits,
integers -128..127) puts the negative extreme on x / scale = -(2^(b-1) - 1/2), a tie, so whether it
took level -2^(b-1) or -(2^(b-1) - 1) depended on float precision and rounding mode (a float64
recomputation moved 2-bit MPQCO sensitivities by up to 13 %); the level -2^(b-1) caught nothing else
(|x| <= amax). Here the integers are ±(2^(b-1) - 1) and the default scale is amax / (2^(b-1) - 1)
(``symmetric_range``, MQBench's restricted range; TensorRT's narrow range): the extreme sits exactly
on the outermost level (2-bit weights: {-amax, 0, amax}). ``symmetric_range=False`` keeps torch's
scale: the extreme lands half a step beyond the outermost level and is clamped onto it whichever way
it rounds (the positive one always was); its 2-bit levels ±amax / 1.5 clip a third of the range.
Per tensor, scale and zero_point are scalars; per channel they are (C,) vectors applied along ch_axis.
Bit-widths 1..16 are supported: the
qparams are computed here, torch's fake-quant kernels only apply them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "MAX_BITS",
    "DEFAULT_EPS",
    "quant_range",
    "choose_qparams",
    "fake_quantize",
    "quantization_mse",
    "mse_clip_range",
    "clip_ratios",
]

MAX_BITS = 16
DEFAULT_EPS = float(torch.finfo(torch.float32).eps)  # smallest scale (guards zero ranges)
_CHUNK_ELEMENTS = 1 << 22  # elements per fake-quant call in the clipping search (memory bound)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range (quant_min, quant_max) of a b-bit code.

    signed: (-2^(b-1), 2^(b-1) - 1); unsigned: (0, 2^b - 1). For b = 1 signed this is the two's
    complement range (-1, 0): usable by affine quantization (levels {-scale, 0} shifted by the zero
    point) but not by symmetric quantization, which :func:`choose_qparams` rejects for 1-bit
    signed (its grid would be {-scale, 0}; binary {-a, +a} weights are not an integer-zero-point grid).

    Args:
        bits: bit-width b in [1, 16].
        signed: two's complement (True) or unsigned (False) code.
    """
    _check_bits(bits)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale (elementwise, scale > 0)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def choose_qparams(
    min_val,
    max_val,
    bits: int,
    *,
    symmetric: bool,
    signed: bool,
    pow2_scale: bool = False,
    symmetric_range: bool = True,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Qparams (scale, zero_point, quant_min, quant_max) that cover the real range [min_val, max_val].

    With (qmin, qmax) = quant_range(bits, signed):
      - symmetric, signed, symmetric_range (default): quant_min = -qmax, scale = max(|min|, |max|) / qmax,
        zero_point = 0: the extreme exactly on the outermost level (8 bits: [-127, 127], amax / 127;
        2 bits: {-amax, 0, amax}).
      - symmetric, signed, not symmetric_range: quant_min = -qmax, scale = max(|min|, |max|) / (qmax + 1/2)
        (torch's scale, 8 bits: amax / 127.5): the extreme half a step beyond the outermost level,
        clamped onto it whichever way it rounds.
      - symmetric, unsigned (non-negative data): scale = max(max, 0) / qmax, zero_point = 0.
      - affine: the range is widened to include 0 (min <= 0 <= max), scale = (max - min) / (qmax - qmin),
        zero_point = clamp(qmin - round(min / scale), qmin, qmax), so 0.0 is exactly representable.
    pow2_scale rounds each scale up to the next power of two (never clips more than the plain scale).
    Scales are at least eps, so a zero range gives a valid quantizer. Per channel when the inputs
    are 1-D (C,); per tensor when they are scalars (the outputs keep the inputs' shape).

    Args:
        min_val, max_val: observed (or clipped) range; floats or tensors of equal shape.
        bits: bit-width in [1, 16].
        symmetric: zero_point fixed at 0 (True) or affine (False).
        signed: signed integer range (True) or unsigned (False).
        pow2_scale: round scales up to powers of two.
        symmetric_range: symmetric signed grids only: scale amax / (2^(b-1) - 1) (True, MQBench's
            restricted range) or torch's amax / (2^(b-1) - 1/2) (False); the integers are
            ±(2^(b-1) - 1) either way.
        eps: smallest allowed scale.
    Returns:
        scale (float32), zero_point (int32), quant_min, quant_max.
    """
    if symmetric and signed and bits == 1:
        raise ValueError(
            "1-bit signed symmetric quantization has no symmetric grid (levels {-scale, 0}): "
            "use signed=False (levels {0, scale}) or an affine scheme"
        )
    qmin, qmax = quant_range(bits, signed)
    lo = torch.as_tensor(min_val).detach().to(torch.float64)
    hi = torch.as_tensor(max_val).detach().to(torch.float64)
    if lo.shape != hi.shape:
        raise ValueError(f"min_val and max_val shapes differ: {tuple(lo.shape)} vs {tuple(hi.shape)}")
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # (C,) or ()
    if symmetric and signed:
        qmin = -qmax  # -2^(b-1) would only ever catch the tie at -(2^(b-1) - 1/2)
        scale = torch.maximum(-lo, hi) / (qmax if symmetric_range else qmax + 0.5)
    elif symmetric:
        scale = hi / qmax
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.clamp(scale, min=eps)
    if pow2_scale:
        scale = _pow2_ceil(scale)
    scale = scale.to(torch.float32)
    if symmetric:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zero_point = torch.clamp(qmin - torch.round(lo / scale.double()), qmin, qmax).to(torch.int32)
    return scale, zero_point, qmin, qmax


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """Quantize-dequantize x: (clamp(round(x / scale) + zp, quant_min, quant_max) - zp) * scale.

    Per tensor (torch.fake_quantize_per_tensor_affine) when scale has one element and ch_axis is
    None; per channel along ch_axis (torch.fake_quantize_per_channel_affine) otherwise. Gradients
    pass straight through inside the range and are zero outside (the torch kernels' STE). The
    qparams must be on x's device; x keeps its dtype.

    Args:
        x: tensor to quantize.
        scale: () / (1,) or (C,) float scales.
        zero_point: same shape, integer zero points in [quant_min, quant_max].
        quant_min, quant_max: integer range.
        ch_axis: channel axis for per-channel qparams (C == x.shape[ch_axis]).
    """
    if ch_axis is None:
        if scale.numel() != 1:
            raise ValueError(f"per-channel qparams ({scale.numel()} scales) need a ch_axis")
        return torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(()).float(), zero_point.reshape(()).to(torch.int32), quant_min, quant_max
        )
    ch_axis = ch_axis % x.dim()
    scale, zero_point = scale.reshape(-1), zero_point.reshape(-1)
    if scale.numel() == 1 and x.shape[ch_axis] != 1:
        scale, zero_point = scale.expand(x.shape[ch_axis]), zero_point.expand(x.shape[ch_axis])
    return torch.fake_quantize_per_channel_affine(
        x, scale.float(), zero_point.to(torch.int32), ch_axis, quant_min, quant_max
    )


def _reduce_dims(x: torch.Tensor, ch_axis: int | None) -> tuple[int, ...]:
    if ch_axis is None:
        return tuple(range(x.dim()))
    ch_axis = ch_axis % x.dim()
    return tuple(d for d in range(x.dim()) if d != ch_axis)


def quantization_mse(
    x: torch.Tensor,
    min_val,
    max_val,
    bits: int,
    *,
    symmetric: bool,
    signed: bool,
    pow2_scale: bool = False,
    symmetric_range: bool = True,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """Mean squared error mean((Q(x) - x)^2) of quantizing x with the qparams of [min_val, max_val].

    Args:
        x: tensor.
        min_val, max_val: range per tensor (scalars) or per channel ((C,), with ch_axis).
        bits, symmetric, signed, pow2_scale, symmetric_range: as in :func:`choose_qparams`.
        ch_axis: None for per tensor (0-dim result), else the channel axis ((C,) result).
    """
    qp = choose_qparams(
        min_val,
        max_val,
        bits,
        symmetric=symmetric,
        signed=signed,
        pow2_scale=pow2_scale,
        symmetric_range=symmetric_range,
    )
    scale, zp = qp[0].to(x.device), qp[1].to(x.device)
    err = fake_quantize(x.detach().float(), scale, zp, qp[2], qp[3], ch_axis) - x.detach().float()
    return err.pow(2).mean(_reduce_dims(x, ch_axis))


def clip_ratios(grid: int, low: float = 0.01) -> torch.Tensor:
    """Clipping ratios searched by :func:`mse_clip_range`: linspace(low, 1, grid), float64."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    return torch.linspace(low, 1.0, grid, dtype=torch.float64) if grid > 1 else torch.ones(1, dtype=torch.float64)


def mse_clip_range(
    x: torch.Tensor,
    bits: int,
    *,
    symmetric: bool,
    signed: bool,
    pow2_scale: bool = False,
    symmetric_range: bool = True,
    ch_axis: int | None = None,
    ratios: torch.Tensor | Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped range (r * min(x), r * max(x)) with the lowest quantization MSE over ratios r.

    Every candidate ratio is evaluated with the quantizer that will be used (same bits, symmetric,
    signed, pow2_scale, symmetric_range), per tensor or independently per channel. Ratios default to
    :func:`clip_ratios` (100); r = 1 (the min/max range) is a candidate when included in ratios.

    Args:
        x: tensor (weights, or a batch of activations).
        bits, symmetric, signed, pow2_scale, symmetric_range: as in :func:`choose_qparams`.
        ch_axis: None for one range (0-dim results), else one range per channel ((C,) results).
        ratios: clipping ratios r in (0, 1].
    Returns:
        (min_val, max_val) in float32 on x's device.
    """
    r = clip_ratios(100) if ratios is None else torch.as_tensor(ratios, dtype=torch.float64)
    xd = x.detach().float()
    if ch_axis is None:
        x2 = xd.reshape(1, -1)  # (1, K)
    else:
        x2 = xd.movedim(ch_axis % x.dim(), 0).reshape(x.shape[ch_axis], -1)  # (C, K)
    c, k = x2.shape
    lo, hi = torch.aminmax(x2, dim=1)  # (C,)
    lo, hi = lo.double().cpu(), hi.double().cpu()
    best_err = torch.full((c,), math.inf, dtype=torch.float64)
    best_lo, best_hi = lo.clone(), hi.clone()
    step = max(1, _CHUNK_ELEMENTS // max(1, c * k))
    for start in range(0, r.numel(), step):
        rc = r[start : start + step]  # (G,)
        cand_lo, cand_hi = rc[:, None] * lo[None], rc[:, None] * hi[None]  # (G, C)
        scale, zp, qmin, qmax = choose_qparams(
            cand_lo.reshape(-1),
            cand_hi.reshape(-1),
            bits,
            symmetric=symmetric,
            signed=signed,
            pow2_scale=pow2_scale,
            symmetric_range=symmetric_range,
        )
        xe = x2.unsqueeze(0).expand(rc.numel(), c, k).reshape(-1, k)  # (G*C, K)
        fq = fake_quantize(xe, scale.to(x.device), zp.to(x.device), qmin, qmax, ch_axis=0)
        err = (fq - xe).pow(2).sum(1).view(rc.numel(), c).double().cpu()  # (G, C)
        e_min, idx = err.min(0)  # (C,)
        better = e_min < best_err
        pick = torch.arange(c)
        best_err = torch.where(better, e_min, best_err)
        best_lo = torch.where(better, cand_lo[idx, pick], best_lo)
        best_hi = torch.where(better, cand_hi[idx, pick], best_hi)
    if ch_axis is None:
        best_lo, best_hi = best_lo[0], best_hi[0]
    return best_lo.float().to(x.device), best_hi.float().to(x.device)
