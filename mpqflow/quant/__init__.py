"""Quantization core: stateless qparams and fake quantization (:mod:`.functional`)."""

from .functional import (
    choose_qparams,
    clip_ratios,
    fake_quantize,
    mse_clip_range,
    quant_range,
    quantization_mse,
)

__all__ = [
    "quant_range",
    "choose_qparams",
    "fake_quantize",
    "quantization_mse",
    "mse_clip_range",
    "clip_ratios",
]
