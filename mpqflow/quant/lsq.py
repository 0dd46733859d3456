"""LSQ learnable quantizers (Esser et al., "Learned Step Size Quantization", ICLR 2020) for
quantization-aware fine-tuning of a per-layer (w_bits, a_bits) decision.

    prepare_lsq(net, {"conv1": (4, 8), "fc": (8, None)}, quantizer=q)   # steps from a calibrated ModelQuantizer
    prepare_lsq(net, decision, weight_init="lsq"); init_activations(net, [x0])  # the paper's init
    loss.backward(); opt.step()                                         # weights and steps train together
    lsq_assignment(net)                                                 # {"conv1": (4, 8), "fc": (8, None)}

x̂ = s · round(clamp(x / s, Qn, Qp)). Gradients (the paper's eq. 3 and STE): dx̂/dx = 1 for
Qn < x/s < Qp, else 0; dx̂/ds = round(x/s) - x/s inside, Qn or Qp outside, times the gradient
scale g = 1 / sqrt(N · Qp) (N: elements per step; for activations the features of one sample).

Layers become :class:`QuantConv2d` / :class:`QuantLinear` (same Parameters) with ``weight_quant`` and
``act_quant`` :class:`LsqQuantizer` submodules (None = FP). Integer export: :mod:`mpqflow.quant.export`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import DEFAULT_EPS, quant_range
from .qparams import QParams
from .quantizer import ModelQuantizer

__all__ = ["MAX_LSQ_BITS", "WEIGHT_INITS", "lsq_range", "lsq_quantize", "LsqQuantizer", "QuantConv2d", "QuantLinear"]
__all__ += ["prepare_lsq", "init_activations", "lsq_layers", "lsq_assignment", "calibrated_step"]

MAX_LSQ_BITS = 8  # integer codes fit int8 / uint8
WEIGHT_INITS = ("calibrated", "lsq", "limpq", None)  # None: steps left for load_state_dict


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp): signed (-2^(b-1), 2^(b-1) - 1) for b in 2..8, unsigned (0, 2^b - 1) for b in 1..8."""
    low = 2 if signed else 1
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not low <= bits <= MAX_LSQ_BITS:
        raise ValueError(
            f"LSQ {'signed' if signed else 'unsigned'} bits must be an integer in [{low}, {MAX_LSQ_BITS}], got {bits!r}"
        )
    return quant_range(int(bits), bool(signed))


def _codes(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, q): v = x / s as torch's fake-quant kernels compute it (x times the reciprocal, so the grids are
    bit-identical), q = clamp(round(v), Qn, Qp) (= round(clamp(v)) for integer bounds; half to even)."""
    v = x * torch.reciprocal(step)
    return v, torch.clamp(torch.round(v), qn, qp)


class _LsqFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, qn, qp, grad_scale):
        v, q = _codes(x, step, qn, qp)
        ctx.save_for_backward(v)
        ctx.qn, ctx.qp, ctx.grad_scale, ctx.step_shape = qn, qp, grad_scale, step.shape
        return (q * step).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        inside = (v > ctx.qn) & (v < ctx.qp)
        q = torch.clamp(torch.round(v), ctx.qn, ctx.qp)  # outside: exactly Qn or Qp
        ds = torch.where(inside, q - v, q)  # the paper's dx̂/ds
        grad_step = (grad.to(v.dtype) * ds).sum_to_size(ctx.step_shape) * ctx.grad_scale
        return grad * inside, grad_step, None, None, None


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_scale: float) -> torch.Tensor:
    """LSQ fake quantization x̂ = s · round(clamp(x / s, Qn, Qp)) with the paper's gradients.

    Args:
        x: tensor to quantize.
        step: s > 0, a scalar or a tensor broadcastable to x (e.g. (C, 1, 1, 1) per output channel).
        qn, qp: integer range (:func:`lsq_range`).
        grad_scale: g multiplying the step gradient (1 / sqrt(N · Qp) in the paper).
    """
    if not (int(qn) < int(qp) and grad_scale > 0):
        raise ValueError(f"need qn < qp and grad_scale > 0, got ({qn}, {qp}) and {grad_scale!r}")
    return _LsqFunction.apply(x, step, int(qn), int(qp), float(grad_scale))


class LsqQuantizer(nn.Module):
    """A learnable-step quantizer: parameter ``step`` (() or (channels,)), buffers ``quant_min`` / ``quant_max``.

    Args:
        bits: bit-width (signed 2..8, unsigned 1..8).
        signed: integer range; None = decided by :meth:`init_lsq` (signed iff some value < 0) or by a
            loaded state_dict; the buffers hold (0, 0) until then.
        channels: None per tensor, else one step per channel along ch_axis.
        ch_axis: channel axis of the quantized tensor.
        per_sample: activations: N of the gradient scale counts the features of one sample (dim 0 is
            the batch), as in the paper; weights: N = elements per step.
        eps: smallest step used in forward.
    """

    def __init__(self, bits, signed, channels=None, ch_axis=0, *, per_sample=False, eps=DEFAULT_EPS):
        super().__init__()
        lsq_range(bits, signed if signed is not None else False)
        if channels is not None and (isinstance(channels, bool) or int(channels) < 1):
            raise ValueError(f"channels must be None or a positive int, got {channels!r}")
        self.bits, self.channels, self.ch_axis = int(bits), None if channels is None else int(channels), ch_axis
        self.per_sample, self.eps = per_sample, eps
        self.step = nn.Parameter(torch.ones(() if channels is None else (self.channels,)))
        self.register_buffer("quant_min", torch.zeros((), dtype=torch.int64))
        self.register_buffer("quant_max", torch.zeros((), dtype=torch.int64))
        self.initialized = False  # set by init_* and load_state_dict: forward refuses uninitialized steps
        self._set_signed(signed)

    def _set_signed(self, signed: bool | None) -> None:
        self.signed = None if signed is None else bool(signed)
        self.qn, self.qp = (None, None) if signed is None else lsq_range(self.bits, self.signed)
        self.quant_min.fill_(self.qn or 0)
        self.quant_max.fill_(self.qp or 0)

    def extra_repr(self) -> str:
        sign = "undecided" if self.signed is None else ("signed" if self.signed else "unsigned")
        return f"bits={self.bits}, {sign}, channels={self.channels}, ch_axis={self.ch_axis}"

    def effective_step(self) -> torch.Tensor:
        """|step| clamped to eps. abs, not a clamp alone, so that an update overshooting through zero
        still leaves a gradient (a clamped step would freeze at eps); the clamp guards division by 0."""
        return self.step.abs().clamp_min(self.eps)

    def _shaped(self, step: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channels is None:
            return step
        axis = self.ch_axis % x.dim()
        if x.shape[axis] != self.channels:
            raise ValueError(f"{self.channels} steps along dim {axis}, but the tensor has shape {tuple(x.shape)}")
        shape = [1] * x.dim()
        shape[axis] = self.channels
        return step.view(shape)  # e.g. (C, 1, 1, 1)

    def grad_scale(self, x: torch.Tensor) -> float:
        """g = 1 / sqrt(N · Qp), N = elements of x per step (per sample when per_sample)."""
        n = x.numel() // (self.channels or 1) // (x.shape[0] if self.per_sample else 1)
        return 1.0 / math.sqrt(max(n, 1) * self.qp)

    def _require_ready(self) -> None:
        if self.signed is None or not self.initialized:
            raise RuntimeError("LSQ step not initialized: use init_* (init_activations for a model) or load a state")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ fake quantization of x (:func:`lsq_quantize`)."""
        self._require_ready()
        return lsq_quantize(x, self._shaped(self.effective_step(), x), self.qn, self.qp, self.grad_scale(x))

    @torch.no_grad()
    def integer(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x (int8 signed, uint8 unsigned); codes · step is exactly forward(x)."""
        self._require_ready()
        _, q = _codes(x, self._shaped(self.effective_step(), x), self.qn, self.qp)
        return q.to(torch.int8 if self.signed else torch.uint8)

    def _per_channel(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        return x.reshape(1, -1) if self.channels is None else x.movedim(self.ch_axis % x.dim(), 0).flatten(1)

    @torch.no_grad()
    def _fill(self, step: torch.Tensor) -> None:
        step = step.detach().to(self.step.device, torch.float32)  # (1,) or (C,)
        if step.numel() not in (1, self.channels or 1):
            raise ValueError(f"got {step.numel()} step values for a quantizer with {self.channels or 1} step(s)")
        if not bool(torch.isfinite(step).all()) or bool((step <= 0).any()):
            raise ValueError(f"steps must be finite and > 0, got {step}")
        self.step.copy_(step.reshape(-1)[0] if self.channels is None else step.expand(self.channels))
        self.initialized = True

    def init_lsq(self, x: torch.Tensor) -> None:
        """The paper's init s = 2 · mean|x| / sqrt(Qp) (per channel when per-channel); decides an
        undecided sign from x."""
        if self.signed is None:
            self._set_signed(bool((x < 0).any()))
        self._fill((2 * self._per_channel(x).abs().mean(1) / math.sqrt(self.qp)).clamp_min(self.eps))

    def init_limpq(self, w: torch.Tensor) -> None:
        """LIMPQ's weight init s = max(|μ - 3σ|, |μ + 3σ|) / 2^(b-1) (σ: sample std; signed only)."""
        if not self.signed:
            raise ValueError("init_limpq is LIMPQ's init of signed weights; this quantizer is not signed")
        x = self._per_channel(w)  # (C, K) or (1, K)
        mu, sigma = x.mean(1), x.std(1, correction=1 if x.shape[1] > 1 else 0)
        self._fill((torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / -self.qn).clamp_min(self.eps))

    def init_scale(self, scale: torch.Tensor) -> None:
        """Copy a calibrated scale: one value, or one per channel."""
        self._fill(torch.as_tensor(scale).detach().reshape(-1))

    def _load_from_state_dict(self, state, prefix, local_metadata, strict, missing, unexpected, errors):
        lo, hi = (int(state.get(prefix + k, 0)) for k in ("quant_min", "quant_max"))
        signed = self.signed if (lo, hi) == (0, 0) else lo < 0  # (0, 0): the state's sign is undecided
        if (lo, hi) != (0, 0) and ((lo, hi) != quant_range(self.bits, signed) or self.signed not in (None, signed)):
            errors.append(
                f"{prefix}quant_min/max: the state's range is {(lo, hi)}, this quantizer's {self.extra_repr()}"
            )
            signed = self.signed
        super()._load_from_state_dict(state, prefix, local_metadata, strict, missing, unexpected, errors)
        self._set_signed(signed)  # an undecided quantizer adopts the state's sign; buffers never keep a (0, 0)
        self.initialized = self.initialized or (prefix + "step" in state and signed is not None)


class _LsqLayer:
    """Mixin of the LSQ layers: optional ``weight_quant`` / ``act_quant`` (None = FP) applied in forward."""

    def __init__(self, *args, weight_quant: LsqQuantizer | None = None, act_quant: LsqQuantizer | None = None, **kw):
        super().__init__(*args, **kw)
        self.register_module("weight_quant", weight_quant)
        self.register_module("act_quant", act_quant)

    @property
    def bits(self) -> tuple[int | None, int | None]:
        """(w_bits, a_bits), None for an FP part."""
        return tuple(None if q is None else q.bits for q in (self.weight_quant, self.act_quant))

    def _quantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x if self.act_quant is None else self.act_quant(x)
        return x, self.weight if self.weight_quant is None else self.weight_quant(self.weight)


class QuantConv2d(_LsqLayer, nn.Conv2d):
    """nn.Conv2d with LSQ fake quantization of its weight and input; keyword args weight_quant, act_quant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        x, w = self._quantized(x)
        return self._conv_forward(x, w, self.bias)


class QuantLinear(_LsqLayer, nn.Linear):
    """nn.Linear with LSQ fake quantization of its weight and input; keyword args weight_quant, act_quant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_features)
        x, w = self._quantized(x)
        return F.linear(x, w, self.bias)


def _swap(m: nn.Module, wq: LsqQuantizer | None, aq: LsqQuantizer | None) -> nn.Module:
    """The LSQ layer of m holding m's own weight and bias Parameters (built on meta: no allocation, no RNG)."""
    kw = dict(weight_quant=wq, act_quant=aq, device="meta", dtype=m.weight.dtype)
    if isinstance(m, nn.Conv2d):
        args = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups)
        new = QuantConv2d(*args, bias=m.bias is not None, padding_mode=m.padding_mode, **kw)
    else:
        new = QuantLinear(m.in_features, m.out_features, bias=m.bias is not None, **kw)
    new.weight, new.bias = m.weight, m.bias  # the same Parameters: optimizers built earlier keep working
    return new.train(m.training)


def calibrated_step(qp: QParams, qn: int, qpos: int) -> torch.Tensor:
    """The calibrated scale if its grid lies on LSQ's (zero point 0, integers inside [Qn, Qp], e.g. the
    symmetric ±(2^(b-1) - 1): values in range keep their level, but LSQ may then use -2^(b-1), which
    with symmetric_range false catches each negative extreme's tie); else, LSQ having no zero point,
    the step of the symmetric grid covering the calibrated grid's range (torch's full-range rule)."""
    if bool((qp.zero_point == 0).all()) and qn <= qp.quant_min and qp.quant_max == qpos:
        return qp.scale
    zp = qp.zero_point.double()
    lo, hi = (qp.quant_min - zp) * qp.scale.double(), (qp.quant_max - zp) * qp.scale.double()
    step = torch.maximum(-lo, hi) / ((qpos - qn) / 2) if qn < 0 else hi.clamp_min(0) / qpos
    return step.float()


def _check_quantizer(quantizer) -> None:
    if not isinstance(quantizer, ModelQuantizer):
        raise ValueError(f"quantizer must be a ModelQuantizer, got {type(quantizer).__name__}")
    if not quantizer.calibrated:
        raise ValueError("quantizer is not calibrated: call calibrate() or load_state_dict() first")
    if quantizer.assignment:
        raise ValueError(f"quantizer has an assignment applied ({sorted(quantizer.assignment)}): remove() it first")


def _option(name: str, option) -> tuple[int | None, int | None]:
    bad = not isinstance(option, (tuple, list)) or len(option) != 2
    if bad or any(b is not None and (isinstance(b, bool) or not isinstance(b, numbers.Integral)) for b in option):
        raise ValueError(f"assignment of {name!r} must be (w_bits | None, a_bits | None), got {option!r}")
    return tuple(None if b is None else int(b) for b in option)


def _from_quantizer(name: str, quantizer, kind: str, bits: int) -> QParams:
    if name not in quantizer.layers:
        raise ValueError(f"layer {name!r} is not among the quantizer's layers")
    have = quantizer.w_bits if kind == "weight" else quantizer.a_bits
    if bits not in have:
        raise ValueError(f"layer {name!r}: the quantizer has no {kind} qparams at {bits} bits (has {list(have)})")
    scheme = quantizer.weight_scheme if kind == "weight" else quantizer.act_scheme
    if scheme.levels != "uniform" or scheme.bit_allocation or (kind == "act" and scheme.per_channel):
        raise ValueError(f"layer {name!r}: the quantizer's {kind} scheme has no LSQ equivalent to copy ({scheme})")
    get = quantizer.weight_qparams if kind == "weight" else quantizer.act_qparams
    return get(name, bits)


def _weight_quant(name, m, bits, quantizer, weight_init, per_channel) -> LsqQuantizer:
    wq = LsqQuantizer(bits, True, m.weight.shape[0] if per_channel else None).to(m.weight.device)
    if weight_init == "calibrated":
        qp = _from_quantizer(name, quantizer, "weight", bits)
        theirs = quantizer.model.get_submodule(name).weight
        if theirs.shape != m.weight.shape or not torch.equal(theirs.detach().to(m.weight.device), m.weight.detach()):
            raise ValueError(f"layer {name!r}: weights differ from the quantizer's model; calibrate again")
        if qp.ch_axis not in (None, 0) or (qp.scale.numel() > 1 and not per_channel):
            raise ValueError(f"layer {name!r}: calibrated weight scales along axis {qp.ch_axis} do not fit")
        wq.init_scale(calibrated_step(qp, wq.qn, wq.qp))
    elif weight_init is not None:
        getattr(wq, f"init_{weight_init}")(m.weight)  # init_lsq or init_limpq
    return wq


def _act_quant(name, m, bits, quantizer, signed) -> LsqQuantizer:
    qp = None if quantizer is None else _from_quantizer(name, quantizer, "act", bits)
    if signed is None and qp is not None:
        signed = qp.quant_min < 0  # the observer saw negative inputs
    aq = LsqQuantizer(bits, signed, per_sample=True).to(m.weight.device)
    if qp is not None:
        aq.init_scale(calibrated_step(qp, aq.qn, aq.qp))
    return aq


def prepare_lsq(net, assignment, *, quantizer=None, weight_init="calibrated", per_channel=True, act_signed=None):
    """Swap the layers of `assignment` for LSQ layers in place and initialise their steps; returns net.

    Args:
        net: the model; each layer keeps its weight / bias Parameters and device.
        assignment: {qualified layer name: (w_bits | None, a_bits | None)} (None: that part stays FP).
        quantizer: a calibrated ModelQuantizer of the same weights (no assignment applied). Its input
            qparams give the activation steps and signs whenever it is given: exact for zero-point-0
            grids (e.g. post-ReLU inputs under an affine scheme), a covering symmetric step otherwise.
        weight_init: "calibrated" (the quantizer's weight scales: the same fake-quant weights for symmetric
            schemes, bias correction aside), "lsq" (:meth:`LsqQuantizer.init_lsq`), "limpq" or None (no init).
        per_channel: one weight step per output channel (else one per tensor).
        act_signed: input signs: a bool for all layers, {layer: bool}, or None = the quantizer's, else
            decided by :func:`init_activations` (which is needed without a quantizer anyway).
    """
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"weight_init must be one of {list(WEIGHT_INITS)}, got {weight_init!r}")
    if weight_init == "calibrated" and quantizer is None:
        raise ValueError("weight_init='calibrated' needs the calibrated quantizer")
    if quantizer is not None:
        _check_quantizer(quantizer)
    if isinstance(act_signed, Mapping) and set(act_signed) - set(assignment):
        raise ValueError(f"act_signed names layers not in the assignment: {sorted(set(act_signed) - set(assignment))}")
    named, swaps = dict(net.named_modules()), {}
    for name, option in assignment.items():  # validate and build everything before touching net
        m = named.get(name) if name else None
        if m is None:
            raise ValueError(f"assignment names {name!r}, which is not a (sub)module of the model")
        if type(m) not in (nn.Conv2d, nn.Linear):
            raise ValueError(f"layer {name!r} is a {type(m).__name__}, expected nn.Conv2d or nn.Linear")
        if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks:
            raise ValueError(f"layer {name!r} has hooks registered; remove them before prepare_lsq")
        w, a = _option(name, option)
        signed = act_signed.get(name) if isinstance(act_signed, Mapping) else act_signed
        try:
            wq = None if w is None else _weight_quant(name, m, w, quantizer, weight_init, per_channel)
            aq = None if a is None else _act_quant(name, m, a, quantizer, signed)
        except ValueError as err:
            raise ValueError(err.args[0] if name in str(err) else f"layer {name!r}: {err}") from None
        if wq is not None or aq is not None:
            swaps[name] = _swap(m, wq, aq)
    for name, new in swaps.items():
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent), attr, new)
    return net


def lsq_layers(net: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: QuantConv2d / QuantLinear} of the model, in module order."""
    return {n: m for n, m in net.named_modules() if isinstance(m, _LsqLayer)}


def lsq_assignment(net: nn.Module) -> dict[str, tuple[int | None, int | None]]:
    """{layer: (w_bits | None, a_bits | None)} of the model's LSQ layers."""
    return {n: m.bits for n, m in lsq_layers(net).items()}


def init_activations(net: nn.Module, batches: Iterable) -> None:
    """The paper's init of every input quantizer (:meth:`LsqQuantizer.init_lsq`) from the first batch.

    The model runs once in eval mode under no_grad (BN statistics untouched, mode restored); each
    layer's input is taken before its act_quant, after the already initialised quantizers upstream.
    """
    layers = {n: m for n, m in lsq_layers(net).items() if m.act_quant is not None}
    batch, seen = next(iter(batches), None), set()
    if batch is None:
        raise ValueError("init_activations got no batch")

    def hook(module, args):
        module.act_quant.init_lsq(args[0])  # the layer's input, before its act_quant
        seen.add(module)

    handles, was_training = [m.register_forward_pre_hook(hook) for m in layers.values()], net.training
    try:
        with torch.no_grad():
            net.eval()(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    if len(seen) < len(layers):
        raise RuntimeError(f"layers never ran in init_activations: {[n for n, m in layers.items() if m not in seen]}")
