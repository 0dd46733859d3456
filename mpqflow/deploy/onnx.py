"""ONNX export of a quantized model from the simulation's own integer codes: QCDQ or native-type QDQ.

    layers = ptq_layers(quantizer)             # PTQ: a calibrated ModelQuantizer, assignment applied
    layers = lsq_layers_export(net)            # or an LSQ fine-tuned model (prepare_lsq)
    export_onnx("m.onnx", net, example, layers, fmt="qcdq", metadata={"mean": [...], ...})

Each quantized layer becomes, in ONNX terms (x: the layer's input, W: its integer weight codes):

    qcdq: x -> QuantizeLinear(int8|uint8) -> Clip(quant_min, quant_max) -> DequantizeLinear -> Conv|MatMul
          W(int8|uint8 initializer) -> Clip -> DequantizeLinear(per channel, axis 0) ---^     (opset 13)
    qdq:  x [-> float Clip] -> QuantizeLinear(int2|int4|int8) -> DequantizeLinear -> Conv|MatMul
          W(int2|int4|int8 initializer) -> DequantizeLinear ------------------------^   (opset 21; 25 with int2)

then ``Add(bias)`` after the Conv / MatMul. QCDQ (Brevitas' form) stores every code in 8 bits and
declares the layer's bit-width by the integer Clip; QDQ stores codes in the smallest native type that
holds them (int2 from opset 25, int4 from opset 21, int8 otherwise) and clips the float input first
only where the layer's range is narrower than the type's (a symmetric [-7, 7] in int4, 3 bits in
int4): Q(clip(x)) takes the same code as clamp(Q(x)) because (k·s)/s rounds back to the integer k.

Why the graph is built with ``onnx.helper`` from the torch.fx-traced model, not with ``torch.onnx``:
  - the weight codes must be the ones the simulation used. ``torch.onnx`` exports a fake-quantized
    weight as float → QuantizeLinear, so the runtime recomputes round(w/s) by division where torch
    multiplied by the reciprocal, and the .5 ties flip; here the codes are initializers, recovered from
    the simulation's own fake-quantized weight (exactly (code - zp)·s, checked bit for bit).
  - ``torch.onnx`` knows 8-bit Q/DQ only: neither the Clip that narrows a QCDQ layer nor int4 / int2
    types (opsets 21 / 25), nor ModelQuantizer's forward-pre-hooks or LSQ's autograd Functions.
  - its TorchScript path folds BatchNorm into the conv in eval mode (the folded weight would then
    not be the quantized one); here BatchNorm stays a float BatchNormalization node.
  - the bias stays out of the Conv (see below), which ``torch.onnx`` gives no control over.
The cost: only the operators in :data:`SUPPORTED` are translated (those of the digits CNN, the CIFAR
ResNets and torchvision's ResNets and MobileNetV2); any other raises NotImplementedError naming the node.

Bias. ONNX Runtime ≥ 1.23 with its default graph optimisations quantizes a float bias that feeds a
Conv / Gemm with dequantized inputs to int32 at s_in·s_w (to fuse QLinearConv). ``bias="add"``
(default) keeps the Conv / MatMul bias-free and adds the float bias in a separate Add, which ORT
leaves in float, as the simulation computes it; ``bias="conv"`` puts it into the Conv / Gemm, as
``torch.onnx`` would. Measured (ORT 1.32, tests/test_deploy.py, a 3-conv net with biases and
power-of-two scales): "add" is bit-exact at ORT_DISABLE_ALL and ORT_ENABLE_ALL, "conv" is exact with
optimisations off and moves 99.8 % of the logits at ORT_ENABLE_ALL.

Exactness. Every quantizer in the file takes the simulation's code on the same input (tested layer by
layer). Between quantizers the float Conv sums differ in order between torch and ORT; with
power-of-two scales those sums are exact and the logits are bit-exact (digits CNN, resnet18,
mobilenet_v2, both formats); with arbitrary scales a rare input lands across a rounding boundary
(2 of 32768 codes in the digits CNN) and the predicted classes still agree.

The file runs with onnxruntime alone. ``metadata_props`` carry, as JSON strings under ``mpqflow.*``:
input_shape, input_name, output_name, layers ({layer: {w_bits, a_bits, w_dtype, a_dtype}}), format,
source, bias, and whatever ``metadata`` the caller passes (preprocessing: resize, crop, mean, std,
class_names: see :func:`mpqflow.data.preprocessing`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn
from onnx import TensorProto, helper

from ..io import atomic_path
from ..quant.lsq import lsq_layers
from .graph import Graph, float_module_node, function_node, method_node, pair, split_clips_before_narrow_q

__all__ = ["FORMATS", "BIAS_MODES", "SUPPORTED", "QuantTensor", "LayerQuant", "ptq_layers", "lsq_layers_export"]
__all__ += ["export_onnx", "build_onnx"]

FORMATS = ("qcdq", "qdq")
BIAS_MODES = ("add", "conv")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
QCDQ_OPSET, INT4_OPSET, INT2_OPSET = 13, 21, 25


@dataclass(frozen=True)
class QuantTensor:
    """One quantizer as the export writes it: code = clamp(round(x / scale) + zero_point, qmin, qmax).

    Args:
        bits: the layer's bit-width of this tensor (declared range: quant_max - quant_min < 2^bits).
        scale: () per tensor or (C,) per channel, float32.
        zero_point: same shape, integers.
        quant_min, quant_max: the integer range.
        axis: None per tensor, else the channel axis (0 for weights, 1 for inputs).
        codes: weights only: the integer codes (int64, the weight's shape); None for an input.
    """

    bits: int
    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    axis: int | None
    codes: torch.Tensor | None = None

    @property
    def signed(self) -> bool:
        return self.quant_min < 0


@dataclass(frozen=True)
class LayerQuant:
    """The quantized parts of one Conv2d / Linear: its weight codes and its input quantizer (None: FP)."""

    weight: QuantTensor | None
    act: QuantTensor | None

    @property
    def bits(self) -> tuple[int | None, int | None]:
        return tuple(None if q is None else q.bits for q in (self.weight, self.act))


def _along(t: torch.Tensor, axis: int | None, dim: int) -> torch.Tensor:
    """A () or (C,) qparam shaped to broadcast along `axis` of a `dim`-dimensional tensor."""
    if axis is None or t.numel() == 1:
        return t.reshape(())
    shape = [1] * dim
    shape[axis] = -1
    return t.reshape(shape)


def _codes_of(layer: str, wq: torch.Tensor, scale, zero_point, axis) -> torch.Tensor:
    """The integer codes whose dequantization (code - zp)·s is bit for bit the simulation's weight `wq`.

    wq = (code - zp)·s exactly, so wq / s lies within a few ulps of an integer and rounds to it without
    ties (unlike round(w / s) of the FP weight); the product is checked so that a weight off any integer
    grid (non-uniform levels, bias correction) is refused rather than exported wrong."""
    s = _along(scale.float(), axis, wq.dim())
    zp = _along(zero_point.to(torch.int64), axis, wq.dim())
    codes = torch.round(wq.float() / s).to(torch.int64) + zp
    if not torch.equal(((codes - zp).float() * s).to(wq.dtype), wq):
        raise ValueError(
            f"layer {layer!r}: its fake-quantized weight is not (code - zero_point)·scale of any integer codes "
            "(non-uniform levels or bias correction); such weights have no integer grid to export"
        )
    return codes


def ptq_layers(quantizer) -> dict[str, LayerQuant]:
    """{layer: LayerQuant} of the assignment applied on a calibrated ModelQuantizer (layers in FP absent).

    Weight codes come from the simulation's own fake-quantized weight (:meth:`quantized_weight`).
    Per-channel bit allocation and non-uniform levels have no single integer grid: ValueError naming the layer.
    """
    out = {}
    for layer, (w_bits, a_bits) in quantizer.assignment.items():
        weight = act = None
        if w_bits is not None:
            if quantizer.channel_bits(layer, "weight", w_bits) is not None:
                raise ValueError(f"layer {layer!r}: per-channel bit allocation has no single integer grid to export")
            qp = quantizer.weight_qparams(layer, w_bits)
            wq = quantizer.quantized_weight(layer, w_bits).detach().cpu()
            codes = _codes_of(layer, wq, qp.scale.cpu(), qp.zero_point.cpu(), qp.ch_axis)
            weight = QuantTensor(
                w_bits, qp.scale.cpu().float(), qp.zero_point.cpu(), qp.quant_min, qp.quant_max, qp.ch_axis, codes
            )
        if a_bits is not None:
            if quantizer.channel_bits(layer, "act", a_bits) is not None:
                raise ValueError(f"layer {layer!r}: per-channel bit allocation has no single integer grid to export")
            qp = quantizer.act_qparams(layer, a_bits)
            scale, zp = qp.scale.cpu().float(), qp.zero_point.cpu()
            act = QuantTensor(a_bits, scale, zp, qp.quant_min, qp.quant_max, qp.ch_axis)
        out[layer] = LayerQuant(weight, act)
    return out


def lsq_layers_export(net: nn.Module) -> dict[str, LayerQuant]:
    """{layer: LayerQuant} of an LSQ model's layers (:func:`mpqflow.quant.prepare_lsq`): codes from
    :meth:`LsqQuantizer.integer`, steps as scales, zero points 0 (LSQ has none)."""
    out = {}
    for layer, m in lsq_layers(net).items():
        weight = act = None
        if m.weight_quant is not None:
            wq = m.weight_quant
            step = wq.effective_step().detach().float().cpu()
            codes = wq.integer(m.weight.detach()).cpu().to(torch.int64)
            axis = None if wq.channels is None else wq.ch_axis % m.weight.dim()
            weight = QuantTensor(wq.bits, step, torch.zeros_like(step, dtype=torch.int64), wq.qn, wq.qp, axis, codes)
        if m.act_quant is not None:
            aq = m.act_quant
            aq._require_ready()
            step = aq.effective_step().detach().float().cpu()
            act = QuantTensor(aq.bits, step, torch.zeros_like(step, dtype=torch.int64), aq.qn, aq.qp, None)
        if weight is not None or act is not None:
            out[layer] = LayerQuant(weight, act)
    return out


# ---------------------------------------------------------------------------------------------- types


def _storage(q: QuantTensor, fmt: str, int2: bool) -> tuple[int, int, int]:
    """(ONNX element type, type min, type max) that stores q's codes: 8 bits under qcdq; the smallest
    native type under qdq (int2 only when `int2`)."""
    widths = (8,) if fmt == "qcdq" else ((2, 4, 8) if int2 else (4, 8))
    width = next(w for w in widths if w >= q.bits)
    names = {2: ("INT2", "UINT2"), 4: ("INT4", "UINT4"), 8: ("INT8", "UINT8")}[width]
    elem = getattr(TensorProto, names[0] if q.signed else names[1])
    lo, hi = (-(2 ** (width - 1)), 2 ** (width - 1) - 1) if q.signed else (0, 2**width - 1)
    return elem, lo, hi


def _check_range(layer: str, kind: str, q: QuantTensor) -> None:
    """The declared range fits the bit-width, the zero points and (weights) the codes lie inside it."""
    if q.quant_max - q.quant_min >= 2**q.bits or q.quant_min >= q.quant_max:
        raise ValueError(f"layer {layer!r}: {kind} range [{q.quant_min}, {q.quant_max}] does not fit {q.bits} bits")
    zp = q.zero_point.to(torch.int64)
    if int(zp.min()) < q.quant_min or int(zp.max()) > q.quant_max:
        raise ValueError(f"layer {layer!r}: {kind} zero points {zp.tolist()} outside [{q.quant_min}, {q.quant_max}]")
    if q.codes is not None:
        lo, hi = int(q.codes.min()), int(q.codes.max())
        if lo < q.quant_min or hi > q.quant_max:
            raise ValueError(
                f"layer {layer!r}: {kind} codes span [{lo}, {hi}], outside its declared {q.bits}-bit range "
                f"[{q.quant_min}, {q.quant_max}]"
            )
    if not bool(torch.isfinite(q.scale).all()) or bool((q.scale <= 0).any()):
        raise ValueError(f"layer {layer!r}: {kind} scales must be finite and > 0")


def _qparams(g: Graph, base: str, q: QuantTensor, elem: int) -> tuple[str, str, dict]:
    scale = q.scale.float().reshape(-1)
    zp = q.zero_point.to(torch.int64).reshape(-1)
    per_axis = q.axis is not None and scale.numel() > 1
    dims = [scale.numel()] if per_axis else []
    s = g.const(f"{base}.scale", scale.numpy().reshape(dims))
    z = g.typed(f"{base}.zero_point", elem, zp.numpy(), dims)
    return s, z, ({"axis": int(q.axis)} if per_axis else {})


def _int_clip(g: Graph, base: str, x: str, q: QuantTensor, elem: int) -> str:
    """QCDQ's Clip on 8-bit codes: the layer's bit-width as [quant_min, quant_max]."""
    lo, hi = g.typed(f"{base}.qmin", elem, [q.quant_min], []), g.typed(f"{base}.qmax", elem, [q.quant_max], [])
    return g.op("Clip", [x, lo, hi], f"{base}.clip")


def _quantize_input(g: Graph, layer: str, x: str, q: QuantTensor, fmt: str, int2: bool) -> str:
    elem, tmin, tmax = _storage(q, fmt, int2)
    base = f"{layer}.input_quant"
    s, z, axis = _qparams(g, base, q, elem)
    if fmt == "qdq" and (q.quant_min, q.quant_max) != (tmin, tmax):
        if q.axis is not None and q.scale.numel() > 1:
            raise ValueError(f"layer {layer!r}: per-channel inputs narrower than their type need the qcdq format")
        zp, scale = float(q.zero_point.reshape(-1)[0]), float(q.scale.reshape(-1)[0])
        lo = g.const(f"{base}.fmin", np.float32((q.quant_min - zp) * scale))
        hi = g.const(f"{base}.fmax", np.float32((q.quant_max - zp) * scale))
        x = g.op("Clip", [x, lo, hi], f"{base}.fclip")
    code = g.op("QuantizeLinear", [x, s, z], f"{base}.q", **axis)
    if fmt == "qcdq":
        code = _int_clip(g, base, code, q, elem)
    return g.op("DequantizeLinear", [code, s, z], f"{base}.dq", **axis)


def _weight(g: Graph, layer: str, module: nn.Module, q: QuantTensor | None, fmt: str, int2: bool, linear: bool):
    """The weight input of the Conv / MatMul: float, or the integer codes dequantized. Linear weights are
    transposed to (in, out) for MatMul, their per-channel axis with them."""
    if q is None:
        w = module.weight.detach().float().cpu()
        return g.const(f"{layer}.weight", (w.t() if linear else w).contiguous().numpy())
    elem, _, _ = _storage(q, fmt, int2)
    codes, axis = q.codes, q.axis
    if linear:
        codes, axis = codes.t().contiguous(), (None if axis is None else 1 - axis)  # (in, out)
    qt = QuantTensor(q.bits, q.scale, q.zero_point, q.quant_min, q.quant_max, axis, codes)
    base = f"{layer}.weight_quant"
    s, z, ax = _qparams(g, base, qt, elem)
    code = g.typed(f"{layer}.weight_int", elem, codes.numpy(), codes.shape)
    if fmt == "qcdq" and q.bits < 8:
        code = _int_clip(g, base, code, qt, elem)  # declares the width; ORT folds it (a constant)
    return g.op("DequantizeLinear", [code, s, z], f"{base}.dq", **ax)


def _conv(g, name, m: nn.Conv2d, x, lq: LayerQuant | None, fmt, int2, bias_mode):
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise NotImplementedError(f"layer {name!r}: padding {m.padding!r} / mode {m.padding_mode!r} (only int zeros)")
    if lq is not None and lq.act is not None:
        x = _quantize_input(g, name, x, lq.act, fmt, int2)
    w = _weight(g, name, m, None if lq is None else lq.weight, fmt, int2, linear=False)
    ph, pw = pair(m.padding)
    attrs = dict(kernel_shape=pair(m.kernel_size), strides=pair(m.stride), pads=[ph, pw, ph, pw])
    attrs.update(dilations=pair(m.dilation), group=m.groups)
    inputs = [x, w]
    b = None if m.bias is None else m.bias.detach().float().cpu().numpy()
    if b is not None and bias_mode == "conv":
        inputs.append(g.const(f"{name}.bias", b))
    y = g.op("Conv", inputs, name, **attrs)  # (B, C_out, H', W')
    if b is not None and bias_mode == "add":
        y = g.op("Add", [y, g.const(f"{name}.bias", b.reshape(1, -1, 1, 1))], f"{name}.bias_add")
    return y


def _linear(g, name, m: nn.Linear, x, lq: LayerQuant | None, fmt, int2, bias_mode):
    if lq is not None and lq.act is not None:
        x = _quantize_input(g, name, x, lq.act, fmt, int2)
    w = _weight(g, name, m, None if lq is None else lq.weight, fmt, int2, linear=True)  # (in, out)
    b = None if m.bias is None else m.bias.detach().float().cpu().numpy()
    if b is not None and bias_mode == "conv":  # Gemm takes the bias as ORT's QDQ fusion expects it
        return g.op("Gemm", [x, w, g.const(f"{name}.bias", b)], name)
    y = g.op("MatMul", [x, w], name)  # (..., out)
    if b is not None:
        y = g.op("Add", [y, g.const(f"{name}.bias", b)], f"{name}.bias_add")
    return y


def _module_node(g, name, m, x, layers, fmt, int2, bias_mode):
    lq = layers.get(name)
    if isinstance(m, nn.Conv2d):
        return _conv(g, name, m, x, lq, fmt, int2, bias_mode)
    if isinstance(m, nn.Linear):
        return _linear(g, name, m, x, lq, fmt, int2, bias_mode)
    return float_module_node(g, name, m, x)


SUPPORTED = (
    "modules: Conv2d, Linear (and their LSQ versions), BatchNorm2d, ReLU, ReLU6 / Hardtanh, MaxPool2d, "
    "AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Dropout, Identity; functions: relu, relu6, hardtanh, add, "
    "mul, max_pool2d, avg_pool2d, adaptive_avg_pool2d(1), flatten; methods: flatten, relu, add"
)


class _LeafTracer(torch.fx.Tracer):
    """Conv2d / Linear (with LSQ's QuantConv2d / QuantLinear) stay whole: they are what gets quantized."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear)) or super().is_leaf_module(m, qualname)


def build_onnx(
    net: nn.Module,
    example: torch.Tensor,
    layers: dict[str, LayerQuant],
    fmt: str = "qcdq",
    bias: str = "add",
    metadata: dict | None = None,
) -> onnx.ModelProto:
    """The ONNX model of `net` (eval mode) with `layers` quantized; see the module docstring.

    Args:
        net: the FP model; a PTQ decision's weights are read from `layers`, not from the model.
        example: one input batch (B, C, H, W); its shape without the batch is recorded; batch is dynamic.
        layers: {qualified Conv2d / Linear name: LayerQuant} (:func:`ptq_layers`, :func:`lsq_layers_export`).
        fmt: "qcdq" or "qdq".
        bias: "add" (a float Add after the layer, left alone by ORT) or "conv" (inside Conv / Gemm).
        metadata: JSON-able entries stored as metadata_props "mpqflow.<key>".
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {list(FORMATS)}")
    if bias not in BIAS_MODES:
        raise ValueError(f"bias {bias!r}: expected one of {list(BIAS_MODES)}")
    modules = dict(net.named_modules())
    for name, lq in layers.items():
        if not isinstance(modules.get(name), (nn.Conv2d, nn.Linear)):
            raise ValueError(f"layer {name!r} is not a Conv2d / Linear of the model")
        for kind, q in (("weight", lq.weight), ("input", lq.act)):
            if q is not None:
                _check_range(name, kind, q)
        if lq.weight is not None and tuple(lq.weight.codes.shape) != tuple(modules[name].weight.shape):
            raise ValueError(
                f"layer {name!r}: weight codes of shape {list(lq.weight.codes.shape)} for a weight "
                f"of shape {list(modules[name].weight.shape)}"
            )
    int2 = fmt == "qdq" and any(q is not None and q.bits <= 2 for lq in layers.values() for q in (lq.weight, lq.act))
    int4 = fmt == "qdq" and any(q is not None and q.bits <= 4 for lq in layers.values() for q in (lq.weight, lq.act))
    opset = INT2_OPSET if int2 else INT4_OPSET if int4 else QCDQ_OPSET
    was_training = net.training
    net.eval()
    try:
        graph_module = torch.fx.GraphModule(net, _LeafTracer().trace(net))
        with torch.no_grad():
            out_shape = list(net(example[:1]).shape[1:])
        g, values, output = Graph(), {}, None
        for node in graph_module.graph.nodes:
            if node.op == "placeholder":
                if values:
                    raise NotImplementedError("models with more than one input")
                values[node] = INPUT_NAME
                g.name(INPUT_NAME)
                continue
            if node.op == "output":
                output = node.args[0]
                break
            if node.op == "get_attr":
                raise NotImplementedError(f"node {node.name!r}: parameters used outside a module ({node.target})")
            ins = [values[a] for a in node.args if isinstance(a, torch.fx.Node)]  # scalars: read by name below
            if node.op == "call_module":
                values[node] = _module_node(g, node.target, modules[node.target], ins[0], layers, fmt, int2, bias)
            elif node.op == "call_function":
                values[node] = function_node(g, node, ins)
            else:
                values[node] = method_node(g, node, ins)
    finally:
        net.train(was_training)
    if not isinstance(output, torch.fx.Node):
        raise NotImplementedError("models whose output is not a single tensor")
    if fmt == "qdq":
        split_clips_before_narrow_q(g)
    g.nodes.append(helper.make_node("Identity", [values[output]], [OUTPUT_NAME], name=OUTPUT_NAME))
    graph = helper.make_graph(
        g.nodes,
        "mpqflow",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *example.shape[1:]])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", *out_shape])],
        g.inits,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="mpqflow")
    model.ir_version = helper.find_min_ir_version_for(opsets)
    meta = {
        "input_shape": [1, *example.shape[1:]],
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "format": fmt,
        "bias": bias,
        "layers": {
            n: {
                "w_bits": lq.bits[0],
                "a_bits": lq.bits[1],
                "w_dtype": None if lq.weight is None else TensorProto.DataType.Name(_storage(lq.weight, fmt, int2)[0]),
                "a_dtype": None if lq.act is None else TensorProto.DataType.Name(_storage(lq.act, fmt, int2)[0]),
            }
            for n, lq in layers.items()
        },
        **(metadata or {}),
    }
    helper.set_model_props(model, {f"mpqflow.{k}": json.dumps(v) for k, v in meta.items()})
    onnx.checker.check_model(model)
    return model


def export_onnx(path, net, example, layers, fmt="qcdq", bias="add", metadata=None) -> Path:
    """:func:`build_onnx` written to `path` atomically (temp file + rename); returns the path."""
    model = build_onnx(net, example, layers, fmt, bias, metadata)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return path
