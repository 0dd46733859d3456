"""Calibration (measure): observers fed a model's layer inputs and weights give qparams per (layer, kind, bits).

    qparams, ranges, alloc = calibrate_layers(model, {"fc": model.fc}, weight_scheme, act_scheme,
                                              w_bits=(2, 4), a_bits=(8,), batches=loader)
    qparams["fc", "act", 8]            # QParams (CPU)
    ranges["fc", "weight", 4]          # (min_val, max_val) the qparams were made from (CPU)
    alloc.get(("fc", "weight", 4))     # ChannelBits, only when the scheme allocates bits per channel

:meth:`mpqflow.quant.quantizer.ModelQuantizer.calibrate` delegates here and keeps the three tables;
applying them is the quantizer's job (:mod:`.qparams`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from .aciq import aciq_range_from_sums
from .bitalloc import allocate_bits
from .observers import ACIQObserver, Observer, make_observer
from .qparams import ACT_CH_AXIS, ChannelBits, QParams
from .scheme import QuantScheme

__all__ = ["calibrate_layers"]


def _observe_hook(observers: list, module: nn.Module, args: tuple) -> None:
    for obs in observers:
        obs(args[0])


def _allocate(
    obs, lo: torch.Tensor, hi: torch.Tensor, bits: int, scheme: QuantScheme, signed: bool, ch_axis: int
) -> ChannelBits:
    """Bits per channel proportional to log2(alpha_i^{2/3}) with mean `bits`; ACIQ ranges re-clipped per bits_i."""
    alpha = ((hi - lo) / 2).double().clamp_min(torch.finfo(torch.float32).tiny)  # (C,)
    min_bits = 1 if bits == 1 or not (scheme.symmetric and signed) else 2
    cb = allocate_bits(alpha, bits, min_bits=min_bits, max_bits=16)
    if isinstance(obs, ACIQObserver):
        sums = {k: getattr(obs.stats, k) for k in obs.stats._KEYS}
        lo, hi = (t.float().cpu() for t in aciq_range_from_sums(sums, cb, obs.prior, model=obs.model))
    return ChannelBits(
        cb, lo.clone(), hi.clone(), scheme.symmetric, signed, scheme.pow2_scale, ch_axis, scheme.symmetric_range
    )


def _observe_inputs(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    act_scheme: QuantScheme,
    a_bits: Sequence[int],
    batches: Iterable,
    max_samples: int | None,
) -> dict[str, list[Observer]]:
    """Run the model (eval, no_grad) on the batches; returns {layer: [observer per a_bits]}."""
    act_scheme = dataclasses.replace(act_scheme, ch_axis=ACT_CH_AXIS)
    observers = {
        l: [make_observer(act_scheme, b, None).to(m.weight.device) for b in a_bits] for l, m in modules.items()
    }
    hooks = [m.register_forward_pre_hook(functools.partial(_observe_hook, observers[l])) for l, m in modules.items()]
    was_training, n = model.training, 0
    model.eval()
    bar = tqdm(batches, desc="calibrate", unit="batch", mininterval=2, delay=5, file=sys.stderr)
    try:
        with torch.no_grad():
            for batch in bar:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = x if max_samples is None else x[: max_samples - n]
                if len(x) == 0:
                    break
                model(x)
                n += len(x)
                if max_samples is not None and n >= max_samples:
                    break
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise RuntimeError("calibrate() got no samples")
    unseen = [l for l, obs in observers.items() if obs and not obs[0].observed]
    if unseen:
        raise RuntimeError(f"layers never ran during calibration (no input observed): {unseen}")
    return observers


def _observer_qparams(
    obs: Observer, layer: str, kind: str, ch_axis: int | None
) -> tuple[QParams, tuple[torch.Tensor, torch.Tensor]]:
    try:
        scale, zp, qmin, qmax = obs.calculate_qparams()
    except ValueError as err:
        raise ValueError(f"layer {layer!r}, {kind} at {obs.bits} bits: {err}") from None
    rng = (obs.min_val.detach().cpu().clone(), obs.max_val.detach().cpu().clone())
    return QParams(scale.cpu(), zp.cpu(), qmin, qmax, ch_axis), rng


def calibrate_layers(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    weight_scheme: QuantScheme,
    act_scheme: QuantScheme,
    w_bits: Sequence[int],
    a_bits: Sequence[int],
    batches: Iterable,
    max_samples: int | None = None,
) -> tuple[dict, dict, dict]:
    """Qparams of every layer's input at each a_bits and weight at each w_bits.

    The model runs in eval mode under no_grad (its mode is restored); a forward-pre-hook feeds each
    layer's input to one observer per a_bits (per_channel: along dim 1). Weight qparams come from
    one observer per (layer, w_bits) fed the layer's current weight (signed range).

    Args:
        model: the model, run on the batches as it is (no assignment should be applied).
        modules: {name: nn.Conv2d / nn.Linear} of the layers, in the order of the tables.
        weight_scheme, act_scheme: schemes of the weights and of the layer inputs.
        w_bits, a_bits: bit-widths to calibrate.
        batches: input tensors (or tuples/lists whose first item is the input), on the model's device.
        max_samples: stop after this many samples (the last batch is truncated); None uses all.
    Returns:
        (qparams, ranges, alloc), each keyed (layer, "weight" | "act", bits): QParams, (min_val,
        max_val), and ChannelBits (only for schemes with bit_allocation); all on CPU.
    """
    observers = _observe_inputs(model, modules, act_scheme, a_bits, batches, max_samples)
    act_ch_axis = ACT_CH_AXIS if act_scheme.per_channel else None
    w_ch_axis = weight_scheme.ch_axis if weight_scheme.per_channel else None
    qparams, ranges, alloc = {}, {}, {}
    for l, m in modules.items():
        for b, obs in zip(a_bits, observers[l]):
            qparams[l, "act", b], ranges[l, "act", b] = _observer_qparams(obs, l, "act", act_ch_axis)
            if act_scheme.bit_allocation:
                alloc[l, "act", b] = _allocate(
                    obs, *ranges[l, "act", b], b, act_scheme, qparams[l, "act", b].quant_min < 0, ACT_CH_AXIS
                )
        w = m.weight.data
        for b in w_bits:
            obs = make_observer(weight_scheme, b, True).to(w.device)
            obs(w)
            qparams[l, "weight", b], ranges[l, "weight", b] = _observer_qparams(obs, l, "weight", w_ch_axis)
            if weight_scheme.bit_allocation:
                alloc[l, "weight", b] = _allocate(
                    obs, *ranges[l, "weight", b], b, weight_scheme, True, weight_scheme.ch_axis
                )
    return qparams, ranges, alloc
