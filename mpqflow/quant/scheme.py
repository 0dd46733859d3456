"""Quantization scheme: a frozen, self-validating description of how one kind of tensor is quantized.

    w = QuantScheme.of(observer="mse", granularity="per_channel")       # weights
    a = QuantScheme.from_dict({"observer": "ema_minmax", "symmetric": False})  # activations
    QuantScheme.from_dict(a.to_dict()) == a

The fields' defaults are the schema's (`$defs/scheme` in schemas/config.schema.yaml, the one place
defaults live): :meth:`QuantScheme.from_dict` and :meth:`QuantScheme.of` fill what a dict leaves out
from there, and the dataclass itself has none.

The bit-width is not part of the scheme: one scheme serves every bit-width of a layer. Observer
names are looked up in :data:`OBSERVERS`, a registry that :mod:`mpqflow.quant.observers` fills and
later modules extend (``register_observer("aciq_laplace")(factory)``); new knobs (non-uniform levels,
bias correction) become new fields with schema defaults that keep old dicts loading.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..validation import schema_defaults
from .aciq import MODELS as _ACIQ_MODELS  # MSE models of the aciq_* observers' clipping

__all__ = ["GRANULARITIES", "LEVELS", "BIAS_CORRECTIONS", "OBSERVERS", "QuantScheme", "register_observer"]

GRANULARITIES = ("per_tensor", "per_channel")
LEVELS = ("uniform", "alq", "amq")  # weight levels (mpqflow.levels.fit)
BIAS_CORRECTIONS = ("none", "bias", "bias_variance")  # weight correction (mpqflow.quant.bias_correction)

# name -> factory(scheme, bits, signed) returning an Observer (filled by mpqflow.quant.observers)
OBSERVERS: dict[str, Callable[..., Any]] = {}


def register_observer(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers an observer factory ``factory(scheme, bits, signed) -> Observer``.

    Args:
        name: the value of ``QuantScheme.observer`` that selects the factory.
    """

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        OBSERVERS[name] = factory
        return factory

    return deco


# Fields that are no config key: the channel axis of per-channel weights is the layers' output channels.
_OUTSIDE_CONFIG = {"ch_axis": 0}


def _fail(field: str, value: Any, expected: str) -> None:
    raise ValueError(f"QuantScheme.{field}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class QuantScheme:
    """How a tensor is quantized (everything but the bit-width).

    Args:
        observer: statistics that choose the range: "minmax" (running min/max), "ema_minmax"
            (exponential moving average of batch min/max), "mse" (per batch, the clipping ratio of
            the min/max range with the lowest quantization MSE; running min/max of those ranges),
            "ema_mse" (moving average of the per-batch MSE-optimal ranges), or a registered name.
        granularity: "per_tensor" or "per_channel" (one scale per channel along ch_axis).
        symmetric: zero point 0 (True) or affine (False).
        pow2_scale: round scales up to powers of two.
        symmetric_range: symmetric signed grids only (MQBench's knob of that name): scale
            amax / (2^(b-1) - 1), the extreme exactly on the outermost level (True, default; 2-bit
            weights {-amax, 0, amax}), or torch's amax / (2^(b-1) - 1/2) (False; 2-bit levels
            ±amax / 1.5). The integers are ±(2^(b-1) - 1) either way, so no extreme depends on how a
            rounding tie breaks (see :mod:`.functional`).
        ch_axis: channel axis of per-channel weights (0 = output channels of Conv2d/Linear).
        averaging_constant: EMA weight c of the newest batch, range <- range + c (batch - range).
        mse_grid: number of clipping ratios r in linspace(0.01, 1, mse_grid) searched by MSE observers.
        levels: weights only. "uniform" (the observer's qparams) or adaptive non-uniform levels
            "alq" / "amq" (Faghri et al. 2020): 2^(M-1) magnitude levels fitted to |w| / max|w| of
            each channel (per_channel) or of the tensor, nearest-level rounding; the observer's
            range is not used. Needs M >= 2.
        bias_correction: weights only. "none", "bias" (each output channel, along ch_axis, keeps its
            FP mean) or "bias_variance" (mean and centered norm; Banner et al. 2019).
        bit_allocation: per-channel bit allocation (Banner et al. 2019, sec. 4; needs per_channel):
            a layer quantized at M bits gives channel i M_i bits, 2^{M_i} proportional to
            alpha_i^{2/3} (alpha_i: half-width of the channel's calibrated range), integers with mean
            exactly M (:func:`mpqflow.quant.bitalloc.allocate_bits`); ACIQ observers then clip
            each channel at its alpha*(M_i). Uniform levels only.
        aciq_model: aciq_* observers only (and their per-channel re-clipping under bit_allocation):
            the MSE model whose minimizer is the clipping value (:mod:`mpqflow.quant.aciq`):
            "signed_grid" (the grid choose_qparams builds from the range, i.e. the quantizer that is
            applied), "grid" (2^M levels spanning the range) or "banner" (the paper's approximation
            clip + alpha^2 / (3 * 4^M); Laplace alpha* = 2.83b, 3.89b, 5.03b at 2, 3, 4 bits).
    """

    observer: str
    granularity: str
    symmetric: bool
    pow2_scale: bool
    symmetric_range: bool
    ch_axis: int
    averaging_constant: float
    mse_grid: int
    levels: str
    bias_correction: str
    bit_allocation: bool
    aciq_model: str

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            _fail("observer", self.observer, f"one of {sorted(OBSERVERS)}")
        if self.granularity not in GRANULARITIES:
            _fail("granularity", self.granularity, f"one of {list(GRANULARITIES)}")
        for name in ("symmetric", "pow2_scale", "symmetric_range", "bit_allocation"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "a bool")
        if isinstance(self.ch_axis, bool) or not isinstance(self.ch_axis, int):
            _fail("ch_axis", self.ch_axis, "an int")
        c = self.averaging_constant
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            _fail("averaging_constant", c, "a number in (0, 1]")
        g = self.mse_grid
        if isinstance(g, bool) or not isinstance(g, int) or not 2 <= g <= 10000:
            _fail("mse_grid", g, "an int in [2, 10000]")
        if self.levels not in LEVELS:
            _fail("levels", self.levels, f"one of {list(LEVELS)}")
        if self.bias_correction not in BIAS_CORRECTIONS:
            _fail("bias_correction", self.bias_correction, f"one of {list(BIAS_CORRECTIONS)}")
        if self.aciq_model not in _ACIQ_MODELS:
            _fail("aciq_model", self.aciq_model, f"one of {list(_ACIQ_MODELS)}")
        if self.bit_allocation and (not self.per_channel or self.levels != "uniform"):
            _fail(
                "bit_allocation",
                self.bit_allocation,
                "false unless granularity is 'per_channel' and levels is 'uniform'",
            )

    @property
    def per_channel(self) -> bool:
        """True for per-channel granularity."""
        return self.granularity == "per_channel"

    @classmethod
    def from_dict(cls, d: dict) -> QuantScheme:
        """Build from a dict of field values (missing fields take the schema's defaults; `ch_axis`, not a
        config key, 0: output channels); unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"QuantScheme: unknown key(s) {unknown}; expected a subset of {sorted(names)}")
        return cls(**{**_OUTSIDE_CONFIG, **schema_defaults("$defs/scheme"), **d})

    @classmethod
    def of(cls, **fields) -> QuantScheme:
        """:meth:`from_dict` of keyword arguments: ``QuantScheme.of(granularity="per_channel")``."""
        return cls.from_dict(fields)

    def to_dict(self) -> dict:
        """All fields as a plain dict (JSON/YAML-ready); ``from_dict(s.to_dict()) == s``."""
        return dataclasses.asdict(self)
