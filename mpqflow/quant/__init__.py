"""Quantization core: stateless qparams and fake quantization (:mod:`.functional`), schemes and the
observer registry (:mod:`.scheme`), observers that turn statistics into qparams (:mod:`.observers`)."""

from .functional import (
    choose_qparams,
    clip_ratios,
    fake_quantize,
    mse_clip_range,
    quant_range,
    quantization_mse,
)
from .scheme import GRANULARITIES, OBSERVERS, QuantScheme, register_observer
from .observers import EMAMinMaxObserver, EMAMSEObserver, MinMaxObserver, MSEObserver, Observer, make_observer

__all__ = [
    "quant_range",
    "choose_qparams",
    "fake_quantize",
    "quantization_mse",
    "mse_clip_range",
    "clip_ratios",
    "GRANULARITIES",
    "OBSERVERS",
    "QuantScheme",
    "register_observer",
    "Observer",
    "MinMaxObserver",
    "EMAMinMaxObserver",
    "MSEObserver",
    "EMAMSEObserver",
    "make_observer",
]
