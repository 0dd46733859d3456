"""Quantization core: schemes, observers, fake quantization and per-layer assignments on a model.

    from mpqflow.quant import ModelQuantizer, QuantScheme
    q = ModelQuantizer(model, layers, QuantScheme.of(granularity="per_channel"),
                       QuantScheme.of(observer="ema_minmax", symmetric=False), w_bits=[2, 4, 8], a_bits=[4, 8])
    q.calibrate(batches)
    with q.applied({"layer1.0.conv1": (4, 8), "fc": (8, None)}):
        logits = model(x)

Modules: :mod:`.functional` (stateless qparams and fake-quant), :mod:`.scheme` (QuantScheme and the
observer registry), :mod:`.observers` (statistics -> qparams), :mod:`.qparams` (QParams, ChannelBits,
quantize_weight: applying them), :mod:`.calibration` (observers run on a model's layers),
:mod:`.quantizer` (ModelQuantizer). Extensions (pure functions): :mod:`.aciq` (analytical clipping,
GEMMLOWP qparams), :mod:`.bitalloc` (per-channel bits), :mod:`.bias_correction`, :mod:`.entropy`
(bit-rate); ``QuantScheme.levels`` alq / amq fits its levels with :mod:`mpqflow.levels` (a leaf that the
gradient exchange shares). Quantization-aware fine-tuning: :mod:`.lsq` (LSQ learnable quantizers and
layers, ``prepare_lsq`` initialised from a calibrated ModelQuantizer), :mod:`.export` (integer export).
:mod:`.fold` folds BatchNorms into their convs (``quant.fold_bn``), before any of the above sees the model.
"""

from .export import EXPORT_FORMAT, export_integer, load_export, read_export, save_export
from .fold import fold_batchnorm, fold_structure, foldable_batchnorms
from .functional import (
    choose_qparams,
    clip_ratios,
    fake_quantize,
    mse_clip_range,
    quant_range,
    quantization_mse,
)
from .lsq import (
    LsqQuantizer,
    QuantConv2d,
    QuantLinear,
    init_activations,
    lsq_assignment,
    lsq_layers,
    lsq_quantize,
    lsq_range,
    prepare_lsq,
)
from .observers import (
    ACIQObserver,
    EMAMinMaxObserver,
    EMAMSEObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    make_observer,
)
from .qparams import QParams, quantize_weight
from .quantizer import ModelQuantizer
from .scheme import BIAS_CORRECTIONS, GRANULARITIES, LEVELS, OBSERVERS, QuantScheme, register_observer

__all__ = [
    "quant_range",
    "choose_qparams",
    "fake_quantize",
    "quantization_mse",
    "mse_clip_range",
    "clip_ratios",
    "GRANULARITIES",
    "LEVELS",
    "BIAS_CORRECTIONS",
    "OBSERVERS",
    "QuantScheme",
    "register_observer",
    "Observer",
    "MinMaxObserver",
    "EMAMinMaxObserver",
    "MSEObserver",
    "EMAMSEObserver",
    "ACIQObserver",
    "make_observer",
    "ModelQuantizer",
    "QParams",
    "quantize_weight",
    "lsq_range",
    "lsq_quantize",
    "LsqQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "prepare_lsq",
    "init_activations",
    "lsq_layers",
    "lsq_assignment",
    "EXPORT_FORMAT",
    "export_integer",
    "save_export",
    "read_export",
    "load_export",
    "foldable_batchnorms",
    "fold_batchnorm",
    "fold_structure",
]
