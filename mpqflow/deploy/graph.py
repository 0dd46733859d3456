"""The float part of the ONNX translation: the graph under construction and the operators that are not
quantized (BatchNorm, activations, pooling, reshapes, additions) of a torch.fx-traced model.

:mod:`mpqflow.deploy.onnx` adds the quantized Conv / Linear layers and assembles the model.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Graph", "pair", "float_module_node", "function_node", "method_node", "split_clips_before_narrow_q"]


class Graph:
    """The ONNX nodes and initializers under construction, with unique names."""

    def __init__(self):
        self.nodes: list = []
        self.inits: list = []
        self._names: set[str] = set()

    def name(self, base: str) -> str:
        base, i = base.replace("/", "."), 0
        out = base
        while out in self._names:
            i += 1
            out = f"{base}_{i}"
        self._names.add(out)
        return out

    def const(self, base: str, array) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def typed(self, base: str, elem: int, values, dims) -> str:
        """An initializer of an ONNX integer type (int2/int4 have no numpy dtype; make_tensor packs them)."""
        name = self.name(base)
        self.inits.append(helper.make_tensor(name, elem, list(dims), np.asarray(values).reshape(-1).tolist()))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.name(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)]


def _batchnorm(g, name, m: nn.BatchNorm2d, x):
    if m.running_mean is None:
        raise NotImplementedError(f"layer {name!r}: BatchNorm without running statistics")
    c = m.num_features
    w = m.weight.detach() if m.affine else torch.ones(c)
    b = m.bias.detach() if m.affine else torch.zeros(c)
    ins = [g.const(f"{name}.{k}", t.float().cpu().numpy()) for k, t in (("weight", w), ("bias", b))]
    ins += [g.const(f"{name}.{k}", getattr(m, k).float().cpu().numpy()) for k in ("running_mean", "running_var")]
    return g.op("BatchNormalization", [x, *ins], name, epsilon=float(m.eps))


def _clip(g, base, x, lo: float, hi: float):
    return g.op("Clip", [x, g.const(f"{base}.min", np.float32(lo)), g.const(f"{base}.max", np.float32(hi))], base)


def _pool(g, base, x, op, kernel, stride, padding, ceil_mode, dilation=1, count_include_pad=True):
    ph, pw = pair(padding)
    attrs = dict(kernel_shape=pair(kernel), strides=pair(stride if stride else kernel), pads=[ph, pw, ph, pw])
    attrs["ceil_mode"] = int(bool(ceil_mode))
    if op == "MaxPool":
        attrs["dilations"] = pair(dilation)
    else:
        attrs["count_include_pad"] = int(bool(count_include_pad))
    return g.op(op, [x], base, **attrs)


def _global_pool(g, base, x, output_size):
    if pair(output_size) != [1, 1]:
        raise NotImplementedError(f"{base}: adaptive average pooling to {output_size} (only to 1x1)")
    return g.op("GlobalAveragePool", [x], base)


def _flatten(g, base, x, start_dim=0, end_dim=-1):
    if end_dim != -1:
        raise NotImplementedError(f"{base}: flatten with end_dim={end_dim} (only -1)")
    return g.op("Flatten", [x], base, axis=int(start_dim))


_NARROW = {TensorProto.INT2, TensorProto.UINT2, TensorProto.INT4, TensorProto.UINT4}


def split_clips_before_narrow_q(g: Graph) -> None:
    """Float Clip → QuantizeLinear(int4 / int2) becomes Max → Min → QuantizeLinear (same values).

    ORT 1.32's ClipQuantFusion reads the QuantizeLinear's zero point to decide whether the Clip is
    redundant and throws "Unexpected data type for QuantizeLinear input y_zero_point" for 4-bit and
    2-bit types at session creation (MobileNetV2's ReLU6 before a 4-bit input, or the float clip of a
    narrow range); Max / Min are not fused, so the session loads."""
    zp_type = {t.name: t.data_type for t in g.inits}
    narrow_inputs = {
        n.input[0] for n in g.nodes if n.op_type == "QuantizeLinear" and zp_type.get(n.input[2]) in _NARROW
    }
    nodes = []
    for n in g.nodes:
        if n.op_type == "Clip" and n.output[0] in narrow_inputs and zp_type.get(n.input[1]) == TensorProto.FLOAT:
            low = g.name(f"{n.name}.max")
            nodes.append(helper.make_node("Max", [n.input[0], n.input[1]], [low], name=low))
            nodes.append(helper.make_node("Min", [low, n.input[2]], [n.output[0]], name=n.name))
        else:
            nodes.append(n)
    g.nodes = nodes


def float_module_node(g, name: str, m: nn.Module, x: str) -> str:
    """The ONNX node of a module that is not quantized (BatchNorm, activations, pooling, reshapes)."""
    if isinstance(m, nn.BatchNorm2d):
        return _batchnorm(g, name, m, x)
    if isinstance(m, nn.ReLU):
        return g.op("Relu", [x], name)
    if isinstance(m, nn.Hardtanh):  # nn.ReLU6 included
        return _clip(g, name, x, m.min_val, m.max_val)
    if isinstance(m, nn.MaxPool2d):
        return _pool(g, name, x, "MaxPool", m.kernel_size, m.stride, m.padding, m.ceil_mode, m.dilation)
    if isinstance(m, nn.AvgPool2d):
        return _pool(g, name, x, "AveragePool", m.kernel_size, m.stride, m.padding, m.ceil_mode, 1, m.count_include_pad)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return _global_pool(g, name, x, m.output_size)
    if isinstance(m, nn.Flatten):
        return _flatten(g, name, x, m.start_dim, m.end_dim)
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return x  # eval mode
    raise NotImplementedError(f"module {name!r} ({type(m).__name__}) has no ONNX translation here")


def _kw(node, names: tuple[str, ...], defaults: tuple) -> list:
    """Positional and keyword arguments after the input, by name, defaults filled in."""
    args = list(node.args[1:]) + [None] * len(names)
    return [node.kwargs.get(n, args[i] if args[i] is not None else d) for i, (n, d) in enumerate(zip(names, defaults))]


_RELU = (F.relu, torch.relu, torch.relu_)
_ADD = (operator.add, operator.iadd, torch.add)


def function_node(g, node, ins):
    f, base = node.target, node.name
    if f in _RELU:
        return g.op("Relu", [ins[0]], base)
    if f is F.relu6:
        return _clip(g, base, ins[0], 0.0, 6.0)
    if f is F.hardtanh:
        lo, hi = _kw(node, ("min_val", "max_val"), (-1.0, 1.0))
        return _clip(g, base, ins[0], lo, hi)
    if f in _ADD + (operator.mul, torch.mul) and "alpha" not in node.kwargs:
        if len(ins) != 2:
            raise NotImplementedError(f"node {base!r}: {f.__name__} with a constant operand")
        return g.op("Mul" if f in (operator.mul, torch.mul) else "Add", ins, base)
    if f in (F.max_pool2d, torch.max_pool2d):
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        kernel, stride, pad, dil, ceil, ret = _kw(node, names, (None, None, 0, 1, 0, 0))
        if ret:
            raise NotImplementedError(f"{base}: max_pool2d with return_indices")
        return _pool(g, base, ins[0], "MaxPool", kernel, stride, pad, ceil, dil)
    if f in (F.avg_pool2d, torch._C._nn.avg_pool2d):
        kernel, stride, pad, ceil, incl = _kw(
            node, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"), (None, None, 0, 0, 1)
        )
        return _pool(g, base, ins[0], "AveragePool", kernel, stride, pad, ceil, 1, incl)
    if f is F.adaptive_avg_pool2d:
        return _global_pool(g, base, ins[0], _kw(node, ("output_size",), (None,))[0])
    if f is torch.flatten:
        return _flatten(g, base, ins[0], *_kw(node, ("start_dim", "end_dim"), (0, -1)))
    raise NotImplementedError(f"node {base!r}: function {getattr(f, '__name__', f)!r} has no ONNX translation here")


def method_node(g, node, ins):
    if node.target == "flatten":
        return _flatten(g, node.name, ins[0], *_kw(node, ("start_dim", "end_dim"), (0, -1)))
    if node.target in ("relu", "relu_"):
        return g.op("Relu", [ins[0]], node.name)
    if node.target in ("add", "add_", "__add__") and "alpha" not in node.kwargs:
        return g.op("Add", ins[:2], node.name)
    raise NotImplementedError(f"node {node.name!r}: method .{node.target}() has no ONNX translation here")
