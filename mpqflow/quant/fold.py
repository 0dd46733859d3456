"""BatchNorm folding: each Conv2d -> BatchNorm2d pair becomes one conv with the BN in its weight and bias.

Usage:
    pairs, left = foldable_batchnorms(net)   # {conv: bn} to fold, {bn: why not} for the others
    folded = fold_batchnorm(net)             # folds them in place (eval mode); returns {conv: bn}
    fold_structure(fresh_net, folded)        # the same module layout without values: to load a folded state_dict

Integer runtimes (MQBench's backends, HAWQ-V3, ONNX Runtime's QLinearConv) execute a conv and its
BatchNorm as one conv whose weight is w * gamma / sqrt(var + eps) per output channel and whose bias
is (b - mean) * gamma / sqrt(var + eps) + beta: that folded weight is the one they quantize. Folding
here makes the simulation quantize the same weight. In FP (eval mode) the folded model computes the
same function, up to float rounding.

A BN is folded only when its conv's output feeds nothing but that BN and each module is called once
(folding a conv reached twice, or whose output is also used elsewhere, would change the other use);
the BN must use running statistics (track_running_stats), else its eval-mode output depends on the
batch. The conv keeps its name and becomes a conv with a bias, the BN module is replaced by
``nn.Identity`` under its own name, so layer names (the layer table's) stay.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["foldable_batchnorms", "fold_batchnorm", "fold_structure"]
log = logging.getLogger("mpqflow")


def _calls(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """module name -> the graph nodes that call it."""
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    return calls


def foldable_batchnorms(net: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """({conv name: bn name} that can be folded, {bn name: why it cannot} for every other BatchNorm2d).

    The model is traced with torch.fx (nothing runs); a model that does not trace folds nothing and
    every BatchNorm2d is reported with the tracing error.
    """
    modules = dict(net.named_modules())
    batchnorms = [n for n, m in modules.items() if isinstance(m, nn.BatchNorm2d)]
    try:
        graph = fx.symbolic_trace(net).graph
    except Exception as e:  # noqa: BLE001 - any tracing failure means: fold nothing, say why
        reason = f"the model does not trace with torch.fx ({type(e).__name__}: {str(e).splitlines()[0]})"
        return {}, {bn: reason for bn in batchnorms}
    calls = _calls(graph)
    pairs: dict[str, str] = {}
    left: dict[str, str] = {}
    for bn in batchnorms:
        bn_mod, bn_calls = modules[bn], calls.get(bn, [])
        if len(bn_calls) != 1:
            left[bn] = f"called {len(bn_calls)} times in the forward (folding needs exactly one call)"
            continue
        if not bn_mod.track_running_stats or bn_mod.running_mean is None:
            left[bn] = "has no running statistics (track_running_stats=False): its output depends on the batch"
            continue
        source = bn_calls[0].args[0] if bn_calls[0].args else None
        conv = str(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        if conv is None or not isinstance(modules.get(conv), nn.Conv2d):
            left[bn] = "its input is not the output of a Conv2d module"
            continue
        if len(calls[conv]) != 1:
            left[bn] = f"its conv {conv!r} is called {len(calls[conv])} times (folding would change the other calls)"
            continue
        if len(source.users) != 1:
            others = sorted(str(u) for u in source.users if u is not bn_calls[0])
            left[bn] = f"the output of its conv {conv!r} is also used by {others}"
            continue
        if modules[conv].out_channels != bn_mod.num_features:
            left[bn] = f"{bn_mod.num_features} features, its conv {conv!r} has {modules[conv].out_channels} channels"
            continue
        pairs[conv] = bn
    return pairs, left


def _replace_module(net: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, child, new)


def fold_batchnorm(net: nn.Module) -> dict[str, str]:
    """Fold every foldable BatchNorm2d of `net` into its conv, in place; returns {conv: bn} folded.

    `net` must be in eval mode (folding uses the running statistics, which a training-mode forward
    would not). BatchNorms that cannot be folded stay, and a warning names each with the reason.
    """
    if net.training:
        raise ValueError(
            "fold_batchnorm needs an eval-mode model (call net.eval() first): folding uses running statistics"
        )
    pairs, left = foldable_batchnorms(net)
    for conv_name, bn_name in pairs.items():
        conv, bn = net.get_submodule(conv_name), net.get_submodule(bn_name)
        with torch.no_grad():
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        conv.weight, conv.bias = weight, bias
        _replace_module(net, bn_name, nn.Identity())
    if left:
        log.warning(
            "fold_bn: %d BatchNorm2d layer(s) left unfolded (they stay float BatchNorms): %s",
            len(left),
            "; ".join(f"{bn}: {why}" for bn, why in left.items()),
        )
    log.info("fold_bn: folded %d BatchNorm2d layer(s) into their convs", len(pairs))
    return pairs


def fold_structure(net: nn.Module, pairs: dict[str, str]) -> nn.Module:
    """Give `net` the module layout of a model folded with `pairs` ({conv: bn}), in place, without
    folding values: each BN becomes nn.Identity and each conv gains a (zero) bias, so that a folded
    model's state_dict loads into it. A pair naming a missing or wrong module is a ValueError."""
    modules = dict(net.named_modules())
    for conv_name, bn_name in pairs.items():
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, (nn.BatchNorm2d, nn.Identity)):
            raise ValueError(
                f"cannot fold {bn_name!r} into {conv_name!r}: the model has {type(conv).__name__} / "
                f"{type(bn).__name__} there, expected Conv2d / BatchNorm2d (a different architecture?)"
            )
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
        _replace_module(net, bn_name, nn.Identity())
    return net
