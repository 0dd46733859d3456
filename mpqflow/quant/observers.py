"""Observers: modules that collect a range (min_val, max_val) from data and turn it into qparams.

    obs = make_observer(QuantScheme.of(observer="mse", granularity="per_channel"), bits=4, signed=True)
    obs(w)                                                   # records statistics, returns w unchanged
    scale, zero_point, quant_min, quant_max = obs.calculate_qparams()

The running statistics are kept by torch.ao.quantization's collectors (MinMaxObserver,
PerChannelMinMaxObserver and their MovingAverage variants), in the submodule ``stats``, so
``state_dict`` carries them as buffers (``stats.min_val``, ``stats.max_val``). Only the range is
taken from torch: the qparams come from :func:`mpqflow.quant.functional.choose_qparams`, which
handles every bit-width from 1 to 16.

- minmax: running min / max of every batch.
- ema_minmax: range <- range + c (batch range - range), the first batch initializes.
- mse: per batch, the clipped range (r min, r max), r in linspace(0.01, 1, mse_grid), with the lowest
  quantization MSE at this bit-width (per channel for per-channel schemes); running min / max of
  those ranges over batches (MQBench's MSEObserver convention).
- ema_mse: moving average of the per-batch MSE-optimal ranges.
- aciq_laplace, aciq_gauss: the ACIQ clipping range (:mod:`mpqflow.quant.aciq`) from running moment
  sums of all batches, optimal under the MSE model ``scheme.aciq_model``.

``signed=None`` decides from the data: unsigned when every observed value is >= 0 (post-ReLU
activations), signed otherwise.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.ao.quantization import observer as _tao

from .aciq import MODELS, aciq_range_from_sums, merge_sums, moment_sums
from .functional import DEFAULT_EPS, _check_bits, choose_qparams, clip_ratios, mse_clip_range
from .scheme import OBSERVERS, QuantScheme, register_observer

__all__ = [
    "Observer",
    "MinMaxObserver",
    "EMAMinMaxObserver",
    "MSEObserver",
    "EMAMSEObserver",
    "ACIQObserver",
    "make_observer",
]


class Observer(nn.Module):
    """Base observer: ``forward(x)`` records a range and returns x; ``calculate_qparams()`` maps it to qparams.

    Subclasses override ``_make_stats`` (the torch.ao range collector) and optionally ``_observe``.

    Args:
        bits: bit-width in [1, 16].
        symmetric: zero point 0 (True) or affine (False).
        signed: signed integer range, unsigned, or None to decide from the observed data.
        pow2_scale: round scales up to powers of two.
        symmetric_range: symmetric signed scale amax / (2^(b-1) - 1), not amax / (2^(b-1) - 1/2)
            (see ``choose_qparams``).
        ch_axis: None for one range per tensor, else the channel axis of per-channel ranges.
        eps: smallest scale.
    """

    def __init__(
        self,
        bits: int,
        *,
        symmetric: bool = True,
        signed: bool | None = None,
        pow2_scale: bool = False,
        symmetric_range: bool = True,
        ch_axis: int | None = None,
        eps: float = DEFAULT_EPS,
    ):
        super().__init__()
        _check_bits(bits)
        if symmetric and signed is True and bits == 1:
            raise ValueError(
                "1-bit signed symmetric quantization is not supported: use an affine scheme or unsigned data"
            )
        self.bits, self.symmetric, self.signed = bits, symmetric, signed
        self.pow2_scale, self.symmetric_range, self.ch_axis, self.eps = pow2_scale, symmetric_range, ch_axis, eps
        self.stats = self._make_stats()

    def _make_stats(self) -> nn.Module:
        raise NotImplementedError

    def _observe(self, x: torch.Tensor) -> None:
        self.stats(x)

    @property
    def min_val(self) -> torch.Tensor:
        """Collected lower end of the range: () per tensor, (C,) per channel."""
        return self.stats.min_val

    @property
    def max_val(self) -> torch.Tensor:
        """Collected upper end of the range: () per tensor, (C,) per channel."""
        return self.stats.max_val

    @property
    def observed(self) -> bool:
        """True once at least one non-empty tensor was recorded."""
        return self.min_val.numel() > 0 and bool(torch.isfinite(self.min_val).all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record statistics of x (no gradient) and return x unchanged."""
        if x.numel() > 0:
            self._observe(x.detach())
        return x

    def is_signed(self) -> bool:
        """The integer range used: ``signed`` if given, else True iff some observed value was negative."""
        if self.signed is not None:
            return self.signed
        return bool((self.min_val < 0).any())

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(scale, zero_point, quant_min, quant_max) of the collected range (see ``choose_qparams``)."""
        if not self.observed:
            raise RuntimeError(f"{type(self).__name__} has observed no data: run data through it first")
        return choose_qparams(
            self.min_val,
            self.max_val,
            self.bits,
            symmetric=self.symmetric,
            signed=self.is_signed(),
            pow2_scale=self.pow2_scale,
            symmetric_range=self.symmetric_range,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        """Settings shown by repr()."""
        return (
            f"bits={self.bits}, symmetric={self.symmetric}, signed={self.signed}, "
            f"pow2_scale={self.pow2_scale}, symmetric_range={self.symmetric_range}, ch_axis={self.ch_axis}"
        )


class MinMaxObserver(Observer):
    """Running min / max of all recorded tensors (torch.ao (PerChannel)MinMaxObserver)."""

    def _make_stats(self) -> nn.Module:
        if self.ch_axis is None:
            return _tao.MinMaxObserver()
        return _tao.PerChannelMinMaxObserver(ch_axis=self.ch_axis)


class EMAMinMaxObserver(Observer):
    """Exponential moving average of batch min / max (torch.ao MovingAverage(PerChannel)MinMaxObserver).

    Args:
        averaging_constant: weight c of the newest batch: range <- range + c (batch - range).
        (other arguments as :class:`Observer`)
    """

    def __init__(self, bits: int, *, averaging_constant: float = 0.01, **kwargs):
        self.averaging_constant = averaging_constant
        super().__init__(bits, **kwargs)

    def _make_stats(self) -> nn.Module:
        c = self.averaging_constant
        if self.ch_axis is None:
            return _tao.MovingAverageMinMaxObserver(averaging_constant=c)
        return _tao.MovingAveragePerChannelMinMaxObserver(averaging_constant=c, ch_axis=self.ch_axis)


class MSEObserver(Observer):
    """Per batch the MSE-optimal clipped range (r min, r max); running min / max of those ranges.

    Args:
        mse_grid: number of ratios r in linspace(0.01, 1, mse_grid).
        (other arguments as :class:`Observer`)
    """

    def __init__(self, bits: int, *, mse_grid: int = 100, **kwargs):
        self.mse_grid = mse_grid
        super().__init__(bits, **kwargs)

    def _make_stats(self) -> nn.Module:
        # the collector sees per batch the best range as a (2,) or (C, 2) tensor [lo, hi]
        return _tao.MinMaxObserver() if self.ch_axis is None else _tao.PerChannelMinMaxObserver(ch_axis=0)

    def _observe(self, x: torch.Tensor) -> None:
        signed = self.signed if self.signed is not None else bool(x.min() < 0)
        lo, hi = mse_clip_range(
            x,
            self.bits,
            symmetric=self.symmetric,
            signed=signed,
            pow2_scale=self.pow2_scale,
            symmetric_range=self.symmetric_range,
            ch_axis=self.ch_axis,
            ratios=clip_ratios(self.mse_grid),
        )
        self.stats(torch.stack([lo, hi], dim=-1))  # (2,) or (C, 2)


class EMAMSEObserver(MSEObserver):
    """Exponential moving average of the per-batch MSE-optimal ranges.

    Args:
        averaging_constant: weight c of the newest batch's range.
        (other arguments as :class:`MSEObserver`)
    """

    def __init__(self, bits: int, *, averaging_constant: float = 0.01, **kwargs):
        self.averaging_constant = averaging_constant
        super().__init__(bits, **kwargs)

    def _make_stats(self) -> nn.Module:
        c = self.averaging_constant
        if self.ch_axis is None:
            return _tao.MovingAverageMinMaxObserver(averaging_constant=c)
        return _tao.MovingAveragePerChannelMinMaxObserver(averaging_constant=c, ch_axis=0)


def _common(scheme: QuantScheme, signed: bool | None) -> dict:
    return dict(
        symmetric=scheme.symmetric,
        signed=signed,
        pow2_scale=scheme.pow2_scale,
        symmetric_range=scheme.symmetric_range,
        ch_axis=scheme.ch_axis if scheme.per_channel else None,
    )


@register_observer("minmax")
def _minmax(scheme: QuantScheme, bits: int, signed: bool | None) -> Observer:
    return MinMaxObserver(bits, **_common(scheme, signed))


@register_observer("ema_minmax")
def _ema_minmax(scheme: QuantScheme, bits: int, signed: bool | None) -> Observer:
    return EMAMinMaxObserver(bits, averaging_constant=scheme.averaging_constant, **_common(scheme, signed))


@register_observer("mse")
def _mse(scheme: QuantScheme, bits: int, signed: bool | None) -> Observer:
    return MSEObserver(bits, mse_grid=scheme.mse_grid, **_common(scheme, signed))


@register_observer("ema_mse")
def _ema_mse(scheme: QuantScheme, bits: int, signed: bool | None) -> Observer:
    return EMAMSEObserver(
        bits, averaging_constant=scheme.averaging_constant, mse_grid=scheme.mse_grid, **_common(scheme, signed)
    )


# ---------------------------------------------------------------- ACIQ (analytical clipping, mpqflow.quant.aciq)


class _SumStats(nn.Module):
    """Running :func:`~mpqflow.quant.aciq.moment_sums` as buffers (empty until the first batch)."""

    _KEYS = ("n", "s1", "s2", "sabs", "n_pos", "s1_pos", "s2_pos", "lo", "hi")

    def __init__(self, ch_axis: int | None):
        super().__init__()
        self.ch_axis = ch_axis
        for k in self._KEYS:
            self.register_buffer(k, torch.zeros(0, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> None:
        new = moment_sums(x, self.ch_axis)
        if self.n.numel() > 0:
            new = merge_sums({k: getattr(self, k) for k in self._KEYS}, new)
        for k in self._KEYS:
            setattr(self, k, new[k])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for k in self._KEYS:  # buffers start empty: take the stored shapes
            if prefix + k in state_dict:
                setattr(self, k, torch.empty_like(state_dict[prefix + k]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ACIQObserver(Observer):
    """ACIQ range: alpha* minimizing the expected MSE under a Laplace or Gaussian prior fitted to the
    running statistics; [mean - alpha, mean + alpha] or [0, alpha] (all data >= 0), within the data.

    By default (``model="signed_grid"``) two-sided ranges are optimal for the grid
    :func:`choose_qparams` builds from a range symmetric about 0 (pow2_scale widens it further and
    is not modelled): a symmetric signed observer's grid has no level -2^(b-1), so "signed_grid"
    is read as "narrow_grid" there ("symmetric_grid" with symmetric_range false); "grid" and "banner"
    are the other MSE models of :mod:`.aciq`. The Laplace b pools each batch's mean |x - batch mean|,
    which assumes batches are samples of one distribution (shuffled calibration data); sigma and the
    one-sided fits are exact over all batches.

    Args:
        prior: "laplace" or "gauss".
        model: MSE model of the clipping, one of :data:`mpqflow.quant.aciq.MODELS`.
        (other arguments as :class:`Observer`)
    """

    def __init__(self, bits: int, *, prior: str = "laplace", model: str = "signed_grid", **kwargs):
        if model not in MODELS:
            raise ValueError(f"ACIQObserver: model must be one of {list(MODELS)}, got {model!r}")
        super().__init__(bits, **kwargs)
        if model == "signed_grid" and self.symmetric and self.signed is not False:
            # the grid choose_qparams applies (one-sided data: the same as grid)
            model = "narrow_grid" if self.symmetric_range else "symmetric_grid"
        self.prior, self.model = prior, model

    def _make_stats(self) -> nn.Module:
        return _SumStats(self.ch_axis)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.stats
        if st.n.numel() == 0:
            return torch.zeros(0), torch.zeros(0)
        sums = {k: getattr(st, k) for k in _SumStats._KEYS}
        lo, hi = aciq_range_from_sums(sums, self.bits, self.prior, model=self.model)
        return lo.float(), hi.float()

    @property
    def min_val(self) -> torch.Tensor:
        """Lower end of the ACIQ range: () per tensor, (C,) per channel."""
        return self._range()[0]

    @property
    def max_val(self) -> torch.Tensor:
        """Upper end of the ACIQ range: () per tensor, (C,) per channel."""
        return self._range()[1]

    def extra_repr(self) -> str:
        return f"prior={self.prior}, model={self.model}, " + super().extra_repr()


@register_observer("aciq_laplace")
def _aciq_laplace(scheme: QuantScheme, bits: int, signed: bool | None) -> Observer:
    return ACIQObserver(bits, prior="laplace", model=scheme.aciq_model, **_common(scheme, signed))


@register_observer("aciq_gauss")
def _aciq_gauss(scheme: QuantScheme, bits: int, signed: bool | None) -> Observer:
    return ACIQObserver(bits, prior="gauss", model=scheme.aciq_model, **_common(scheme, signed))


def make_observer(scheme: QuantScheme, bits: int, signed: bool | None = None) -> Observer:
    """A fresh observer for `scheme` at `bits` (factory from the registry ``OBSERVERS[scheme.observer]``).

    Args:
        scheme: the quantization scheme (observer kind, granularity, symmetric, pow2_scale, ...).
        bits: bit-width in [1, 16].
        signed: signed / unsigned integer range, or None to decide from the observed data.
    """
    return OBSERVERS[scheme.observer](scheme, bits, signed)
