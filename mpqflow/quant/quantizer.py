"""ModelQuantizer: per-layer mixed-precision assignments on an existing model, applied and removed in place.

    q = ModelQuantizer(model, layers, weight_scheme, act_scheme, w_bits=[2, 4, 8], a_bits=[4, 8])
    q.calibrate(batches)                      # one observer per (layer, a_bits); weight qparams per w_bits
    q.apply({"conv1": (4, 8), "fc": (8, None)})   # weights at 4 / 8 bits, inputs at 8 bits / FP
    q.apply({"conv1": (2, 8)})                # replaces the assignment: only the changed layers move
    q.remove()                                # bit-identical FP model again
    with q.applied(assignment): loss = ...    # apply, then back to the previous assignment

An option (w_bits, a_bits) of a layer quantizes its weight at w_bits and its input activation at
a_bits; None leaves that part in floating point. Applying swaps ``layer.weight.data`` for a cached
fake-quantized copy (computed once per (layer, w_bits) from the FP weight) and registers a
forward-pre-hook that fake-quantizes the layer's input; an unquantized layer has no hook at all.
The FP weight tensors are kept and put back on remove. Nothing is copied: the quantizer works on
``model`` itself, on CPU or CUDA (qparams follow the weight's device).

Do not train or move the model while an assignment is applied; after changing the FP weights,
calibrate again (quantized weights are cached).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from .calibration import calibrate_layers
from .functional import MAX_BITS
from .qparams import ACT_CH_AXIS, ChannelBits, QParams, quantize_weight
from .scheme import QuantScheme

__all__ = ["ModelQuantizer"]

_LAYER_TYPES = (nn.Conv2d, nn.Linear)
_KINDS = ("weight", "act")
_FP = (None, None)
_STATE_VERSION = 1


def _quant_input_hook(qp, module: nn.Module, args: tuple) -> tuple:
    return (qp.fake_quantize(args[0]),) + tuple(args[1:])


def _bits_tuple(name: str, bits: Sequence[int]) -> tuple[int, ...]:
    out = []
    for b in bits:
        if isinstance(b, bool) or int(b) != b or not 1 <= int(b) <= MAX_BITS:
            raise ValueError(f"{name}: every bit-width must be an integer in [1, {MAX_BITS}], got {b!r}")
        out.append(int(b))
    return tuple(sorted(set(out)))


def _diff(what: str, theirs, ours) -> str:
    return f"{what} differ: state has {theirs!r}, this quantizer has {ours!r}"


class ModelQuantizer:
    """Calibrates and applies per-layer (w_bits, a_bits) fake quantization to a model, reversibly.

    Args:
        model: the model (not copied; its layers are modified in place while an assignment is applied).
        layers: qualified names of every nn.Conv2d / nn.Linear that may ever be quantized.
        weight_scheme: scheme of the weights (per_channel: along weight_scheme.ch_axis, 0 = output
            channels); weights use a signed integer range.
        act_scheme: scheme of each layer's input activation (per_channel: along dim 1, the channels
            of (N, C, ...) inputs); signed or unsigned is decided from the calibration data.
        w_bits: weight bit-widths to calibrate.
        a_bits: input-activation bit-widths to calibrate.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        weight_scheme: QuantScheme,
        act_scheme: QuantScheme,
        w_bits: Sequence[int],
        a_bits: Sequence[int],
    ):
        for name, s in (("weight_scheme", weight_scheme), ("act_scheme", act_scheme)):
            if not isinstance(s, QuantScheme):
                raise TypeError(f"{name} must be a QuantScheme, got {type(s).__name__}")
        self.model = model
        self.layers = tuple(layers)
        if len(set(self.layers)) != len(self.layers):
            dup = sorted({l for l in self.layers if self.layers.count(l) > 1})
            raise ValueError(f"layers listed more than once: {dup}")
        named = dict(model.named_modules())
        for name in self.layers:
            if name not in named:
                raise ValueError(f"layer {name!r} is not a module of the model")
            if not isinstance(named[name], _LAYER_TYPES):
                raise ValueError(f"layer {name!r} is a {type(named[name]).__name__}, expected nn.Conv2d or nn.Linear")
        self._modules = {name: named[name] for name in self.layers}
        self.weight_scheme, self.act_scheme = weight_scheme, act_scheme
        self.w_bits, self.a_bits = _bits_tuple("w_bits", w_bits), _bits_tuple("a_bits", a_bits)
        if weight_scheme.symmetric and 1 in self.w_bits:
            raise ValueError(
                "w_bits contains 1, but 1-bit signed symmetric weights have no symmetric grid: "
                "use an affine weight scheme (symmetric: false) or drop 1 from w_bits"
            )
        if weight_scheme.levels != "uniform" and 1 in self.w_bits:
            raise ValueError(f"w_bits contains 1, but levels={weight_scheme.levels!r} needs at least 2 bits")
        if act_scheme.levels != "uniform" or act_scheme.bias_correction != "none":
            raise ValueError(
                "act_scheme: levels and bias_correction apply to weights only "
                f"(got levels={act_scheme.levels!r}, bias_correction={act_scheme.bias_correction!r})"
            )
        self._bits = {"weight": frozenset(self.w_bits), "act": frozenset(self.a_bits)}
        self._qparams: dict[tuple[str, str, int], QParams] = {}  # CPU masters
        self._ranges: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._alloc: dict[tuple[str, str, int], ChannelBits] = {}  # CPU, scheme.bit_allocation only
        self._dev_qparams: dict[tuple[str, str, int, torch.device], QParams] = {}
        self._wq_cache: dict[tuple[str, int], torch.Tensor] = {}
        self._saved_weight: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._assignment: dict[str, tuple[int | None, int | None]] = {}

    # ------------------------------------------------------------------ calibration and state

    @property
    def calibrated(self) -> bool:
        """True after :meth:`calibrate` or :meth:`load_state_dict`."""
        return bool(self._qparams)

    def calibrate(self, batches: Iterable[torch.Tensor], max_samples: int | None = None) -> None:
        """Compute all qparams: activations from the model run on `batches`, weights from the weights.

        The model runs in eval mode under no_grad with no assignment applied (any applied one is
        removed first); a forward-pre-hook feeds each layer's input to one observer per a_bits. Weight
        qparams come from one observer per (layer, w_bits) fed the FP weight. Replaces earlier qparams.
        (:func:`mpqflow.quant.calibration.calibrate_layers`.)

        Args:
            batches: input tensors (or tuples/lists whose first item is the input), on the model's device.
            max_samples: stop after this many samples (the last batch is truncated); None uses all.
        """
        self.remove()
        self._set_qparams(
            *calibrate_layers(
                self.model,
                self._modules,
                self.weight_scheme,
                self.act_scheme,
                self.w_bits,
                self.a_bits,
                batches,
                max_samples,
            )
        )

    def _set_qparams(self, qparams: dict, ranges: dict, alloc: dict | None = None) -> None:
        self.remove()
        self._qparams, self._ranges, self._alloc = qparams, ranges, dict(alloc or {})
        self._dev_qparams.clear()
        self._wq_cache.clear()

    def state_dict(self) -> dict:
        """Everything needed to rebuild the calibrated quantizer (CPU tensors, plain containers).

        Keys: version, layers, weight_scheme, act_scheme (dicts), w_bits, a_bits, and
        qparams[layer]["weight" | "act"][bits] = {scale, zero_point, quant_min, quant_max, ch_axis,
        min_val, max_val} (min_val / max_val: the observed range the qparams were made from), plus
        channel_bits, channel_min, channel_max when the scheme allocates bits per channel.
        """
        self._require_calibrated()
        qp: dict = {l: {k: {} for k in _KINDS} for l in self.layers}
        for (l, kind, b), p in self._qparams.items():
            lo, hi = self._ranges.get((l, kind, b), (None, None))
            qp[l][kind][b] = dict(
                p._asdict(), scale=p.scale.clone(), zero_point=p.zero_point.clone(), min_val=lo, max_val=hi
            )
            cb = self._alloc.get((l, kind, b))
            if cb is not None:
                qp[l][kind][b].update(
                    channel_bits=cb.bits.clone(), channel_min=cb.min_val.clone(), channel_max=cb.max_val.clone()
                )
        return {
            "version": _STATE_VERSION,
            "layers": list(self.layers),
            "weight_scheme": self.weight_scheme.to_dict(),
            "act_scheme": self.act_scheme.to_dict(),
            "w_bits": list(self.w_bits),
            "a_bits": list(self.a_bits),
            "qparams": qp,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Load qparams from :meth:`state_dict`; ValueError naming what differs if the layers, schemes
        or bit lists are not this quantizer's. Removes any applied assignment."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(_diff("state versions", state.get("version"), _STATE_VERSION))
        if list(state["layers"]) != list(self.layers):
            theirs, ours = list(state["layers"]), list(self.layers)
            missing, extra = [l for l in ours if l not in theirs], [l for l in theirs if l not in ours]
            raise ValueError(
                f"layers differ: missing from state {missing}, not in this quantizer {extra}"
                + ("" if missing or extra else " (same names, different order)")
            )
        for key, ours in (("weight_scheme", self.weight_scheme), ("act_scheme", self.act_scheme)):
            theirs = QuantScheme.from_dict(state[key])
            if theirs != ours:
                fields = [
                    f"{f}: {getattr(theirs, f)!r} vs {getattr(ours, f)!r}"
                    for f in theirs.to_dict()
                    if getattr(theirs, f) != getattr(ours, f)
                ]
                raise ValueError(f"{key} differs (state vs this quantizer): " + ", ".join(fields))
        for key in ("w_bits", "a_bits"):
            if tuple(state[key]) != getattr(self, key):
                raise ValueError(_diff(key, list(state[key]), list(getattr(self, key))))
        qparams, ranges, alloc = {}, {}, {}
        for l in self.layers:
            for kind, bits in (("weight", self.w_bits), ("act", self.a_bits)):
                for b in bits:
                    try:
                        e = state["qparams"][l][kind][b]
                    except KeyError:
                        raise ValueError(f"state has no {kind} qparams for layer {l!r} at {b} bits") from None
                    qparams[l, kind, b] = QParams(
                        e["scale"].cpu(), e["zero_point"].cpu(), int(e["quant_min"]), int(e["quant_max"]), e["ch_axis"]
                    )
                    if e.get("min_val") is not None:
                        ranges[l, kind, b] = (e["min_val"].cpu(), e["max_val"].cpu())
                    scheme = self.weight_scheme if kind == "weight" else self.act_scheme
                    if scheme.bit_allocation:
                        if e.get("channel_bits") is None:
                            raise ValueError(f"state has no per-channel bits for {kind} of layer {l!r} at {b} bits")
                        alloc[l, kind, b] = ChannelBits(
                            e["channel_bits"].cpu(),
                            e["channel_min"].cpu(),
                            e["channel_max"].cpu(),
                            scheme.symmetric,
                            int(e["quant_min"]) < 0,
                            scheme.pow2_scale,
                            scheme.ch_axis if kind == "weight" else ACT_CH_AXIS,
                            scheme.symmetric_range,
                        )
        self._set_qparams(qparams, ranges, alloc)

    # ------------------------------------------------------------------ qparams and quantized tensors

    def _require_calibrated(self) -> None:
        if not self._qparams:
            raise RuntimeError("ModelQuantizer is not calibrated: call calibrate() or load_state_dict() first")

    def _qp(self, layer: str, kind: str, bits: int, device: torch.device) -> QParams:
        key = (layer, kind, bits, device)
        qp = self._dev_qparams.get(key)
        if qp is None:
            self._require_calibrated()
            if layer not in self._modules:
                raise ValueError(f"unknown layer {layer!r}: not among the quantizer's layers")
            if bits not in self._bits[kind]:
                allowed = self.w_bits if kind == "weight" else self.a_bits
                raise ValueError(f"{layer!r}: {kind} bits {bits!r} were not calibrated (have {list(allowed)})")
            qp = self._dev_qparams[key] = self._qparams[layer, kind, int(bits)].to(device)
        return qp

    def weight_qparams(self, layer: str, bits: int) -> QParams:
        """Weight qparams of `layer` at `bits`, on the weight's device."""
        return self._qp(layer, "weight", bits, self._fp_weight(layer).device)

    def act_qparams(self, layer: str, bits: int) -> QParams:
        """Input-activation qparams of `layer` at `bits`, on the weight's device."""
        return self._qp(layer, "act", bits, self._fp_weight(layer).device)

    def _fp_weight(self, layer: str) -> torch.Tensor:
        saved = self._saved_weight.get(layer)
        if saved is not None:
            return saved
        if layer not in self._modules:
            raise ValueError(f"unknown layer {layer!r}: not among the quantizer's layers")
        return self._modules[layer].weight.data

    def quantized_weight(self, layer: str, w_bits: int) -> torch.Tensor:
        """Fake-quantized FP weight of `layer` at `w_bits` (cached; do not modify it in place)."""
        fp = self._fp_weight(layer)
        q = self._wq_cache.get((layer, w_bits))
        if q is None or q.device != fp.device or q.dtype != fp.dtype:
            qp = self._qp(layer, "weight", w_bits, fp.device)
            with torch.no_grad():
                q = self._wq_cache[layer, w_bits] = quantize_weight(
                    fp, qp, self.weight_scheme, w_bits, self.channel_bits(layer, "weight", w_bits)
                )
        return q

    def channel_bits(self, layer: str, kind: str, bits: int) -> ChannelBits | None:
        """The per-channel bit allocation of `layer`'s "weight" or "act" quantizer at `bits` (CPU), or
        None when its scheme does not allocate bits."""
        return self._alloc.get((layer, kind, int(bits)))

    def _act_quantizer(self, layer: str, a_bits: int, device: torch.device):
        cb = self.channel_bits(layer, "act", a_bits)
        return cb if cb is not None else self._qp(layer, "act", a_bits, device)

    def quantize_input(self, layer: str, x: torch.Tensor, a_bits: int) -> torch.Tensor:
        """Fake-quantize x with the input-activation qparams of `layer` at `a_bits` (gradients: STE)."""
        return self._act_quantizer(layer, a_bits, x.device).fake_quantize(x)

    # ------------------------------------------------------------------ assignments

    @property
    def assignment(self) -> dict[str, tuple[int | None, int | None]]:
        """The applied assignment {layer: (w_bits, a_bits)} (a copy; layers in FP are absent)."""
        return dict(self._assignment)

    def _check_assignment(self, assignment: Mapping) -> dict[str, tuple[int | None, int | None]]:
        new = {}
        for layer, option in assignment.items():
            if layer not in self._modules:
                raise ValueError(f"assignment names {layer!r}, which is not among the quantizer's layers")
            try:
                w, a = option
            except (TypeError, ValueError):
                raise ValueError(f"assignment of {layer!r} must be (w_bits, a_bits), got {option!r}") from None
            for kind, b in (("weight", w), ("act", a)):
                if b is not None and b not in self._bits[kind]:
                    allowed = self.w_bits if kind == "weight" else self.a_bits
                    raise ValueError(
                        f"assignment of {layer!r}: {kind} bits {b!r} were not calibrated (have {list(allowed)})"
                    )
            if (w, a) != _FP:
                new[layer] = (None if w is None else int(w), None if a is None else int(a))
        return new

    def apply(self, assignment: Mapping[str, tuple[int | None, int | None]]) -> None:
        """Apply {layer: (w_bits, a_bits)} (None = FP), replacing the current assignment wholesale.

        Only layers whose option differs from the applied one are touched: a weight swap is one
        ``weight.data`` assignment of a cached tensor, an input quantizer one hook (un)registration.
        """
        self._require_calibrated()
        new = self._check_assignment(assignment)
        for layer in [l for l in self._assignment if l not in new] + list(new):
            old, nxt = self._assignment.get(layer, _FP), new.get(layer, _FP)
            if old != nxt:
                self._switch(layer, old, nxt)

    def _switch(self, layer: str, old: tuple, nxt: tuple) -> None:
        if old[0] != nxt[0]:
            self._set_weight(layer, nxt[0])
            self._record(layer, (nxt[0], old[1]))
        if old[1] != nxt[1]:
            self._set_act(layer, nxt[1])
            self._record(layer, nxt)

    def _record(self, layer: str, option: tuple) -> None:
        if option == _FP:
            self._assignment.pop(layer, None)
        else:
            self._assignment[layer] = option

    def _set_weight(self, layer: str, bits: int | None) -> None:
        p = self._modules[layer].weight
        if bits is None:
            p.data = self._saved_weight.pop(layer)
            return
        q = self.quantized_weight(layer, bits)
        if layer not in self._saved_weight:
            self._saved_weight[layer] = p.data
        p.data = q

    def _set_act(self, layer: str, bits: int | None) -> None:
        handle = self._hooks.pop(layer, None)
        if handle is not None:
            handle.remove()
        if bits is not None:
            m = self._modules[layer]
            qp = self._act_quantizer(layer, bits, m.weight.device)
            # prepend: other pre-hooks see the input as the layer does
            self._hooks[layer] = m.register_forward_pre_hook(functools.partial(_quant_input_hook, qp), prepend=True)

    def remove(self) -> None:
        """Back to the FP model: the original weight tensors are restored and input quantizers removed."""
        for layer, old in list(self._assignment.items()):
            self._switch(layer, old, _FP)

    @contextmanager
    def applied(self, assignment: Mapping[str, tuple[int | None, int | None]]) -> Iterator[ModelQuantizer]:
        """Context manager: apply `assignment`, yield, then restore the assignment applied before
        (none, usually: the FP model), also when the body raises."""
        previous = dict(self._assignment)
        self.apply(assignment)
        try:
            yield self
        finally:
            if previous:
                self.apply(previous)
            else:
                self.remove()
