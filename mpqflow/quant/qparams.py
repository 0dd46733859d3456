"""Applied quantizers: the qparams of one quantizer and the fake-quantized weight they give.

    qp = QParams(scale, zero_point, quant_min, quant_max, ch_axis=0)
    w_q = qp.fake_quantize(w)                                  # = fake_quantize(w, *qp)
    cb = ChannelBits(bits, lo, hi, symmetric=True, signed=True, pow2_scale=False, ch_axis=0)
    w_q = cb.fake_quantize(w)                                  # channel c at bits[c]
    w_q = quantize_weight(w, qp, scheme, 4)                    # + the scheme's levels, bias correction

Nothing here measures: qparams come from observers (:mod:`.observers`, :mod:`.calibration`);
:class:`~mpqflow.quant.quantizer.ModelQuantizer` stores and applies them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..levels.apply import fake_quantize_levels
from ..levels.fit import fit_levels, levels_for_bits
from .bias_correction import correct_bias
from .bitalloc import fake_quantize_per_channel_bits
from .functional import fake_quantize
from .scheme import QuantScheme

__all__ = ["ACT_CH_AXIS", "QParams", "ChannelBits", "quantize_weight"]

ACT_CH_AXIS = 1  # channel axis of layer inputs (N, C, ...)


class QParams(NamedTuple):
    """Qparams of one quantizer; ``fake_quantize(x, *qp)`` (or ``qp.fake_quantize(x)``) applies them.

    Args:
        scale: () per tensor or (C,) per channel, float32.
        zero_point: same shape, int32.
        quant_min, quant_max: integer range.
        ch_axis: None per tensor, else the channel axis.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    ch_axis: int | None

    def to(self, device: torch.device | str) -> QParams:
        """The same qparams with tensors on `device`."""
        return self._replace(scale=self.scale.to(device), zero_point=self.zero_point.to(device))

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize x with these qparams."""
        return fake_quantize(x, *self)


class ChannelBits(NamedTuple):
    """Per-channel bit allocation of one quantizer (scheme.bit_allocation): channel c is quantized at
    bits[c] on [min_val[c], max_val[c]] (the qparams of each bit group come from ``choose_qparams``).

    Args:
        bits: (C,) int64 bit-widths, mean = the layer's bit-width.
        min_val, max_val: (C,) ranges.
        symmetric, signed, pow2_scale: as in ``choose_qparams``.
        ch_axis: channel axis (0 for weights, 1 for inputs).
        symmetric_range: as in ``choose_qparams`` (symmetric signed grids: scale amax / (2^(b-1) - 1)).
    """

    bits: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor
    symmetric: bool
    signed: bool
    pow2_scale: bool
    ch_axis: int
    symmetric_range: bool = True

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize x, channel c at bits[c]."""
        return fake_quantize_per_channel_bits(
            x,
            self.bits,
            self.min_val,
            self.max_val,
            self.ch_axis,
            symmetric=self.symmetric,
            signed=self.signed,
            pow2_scale=self.pow2_scale,
            symmetric_range=self.symmetric_range,
        )


def quantize_weight(
    w: torch.Tensor, qp: QParams, scheme: QuantScheme, bits: int, alloc: ChannelBits | None = None
) -> torch.Tensor:
    """Fake-quantized weight under `scheme` at `bits`: uniform with qp (or with the per-channel bits
    `alloc`, when given), or the scheme's non-uniform levels (fitted to w, per channel along qp.ch_axis
    or per tensor), then the scheme's bias correction per output channel (along scheme.ch_axis).
    Deterministic in w, so nothing beyond qp (and alloc) is stored."""
    if alloc is not None:
        q = alloc.fake_quantize(w)
    elif scheme.levels == "uniform":
        q = fake_quantize(w, *qp)
    else:
        lv = fit_levels(w, levels_for_bits(bits), scheme.levels, ch_axis=qp.ch_axis).to(w.device)
        q = fake_quantize_levels(w, lv, ch_axis=qp.ch_axis)
    if scheme.bias_correction != "none":
        q = correct_bias(w, q, scheme.ch_axis, variance=scheme.bias_correction == "bias_variance")
    return q
