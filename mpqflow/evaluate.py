"""Evaluate a quantized assignment: held-out metrics plus size, average bits, BitOPs and bit-rates.

Usage:
    metrics = evaluate_assignment(ctx, assignment, batch_size=256)     # top1, top5, loss, size_mb, ...
    loss = assignment_loss(ctx, assignment, indices, batch_size=256)   # mean CE on training samples
    metrics = evaluate_lsq_model(net, table, test_set, 256, device)   # a fine-tuned LSQ model, same keys

`ctx` is a :class:`mpqflow.context.Context` (model, calibrated quantizer, layer table, data).
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from .metrics import evaluate
from .quant.entropy import entropy_bits, mean_entropy_bits
from .quant.lsq import lsq_assignment, lsq_layers

__all__ = ["evaluate_assignment", "evaluate_lsq_model", "assignment_loss"]
log = logging.getLogger("mpqflow")


# Samples of the first evaluation batch whose quantized layer inputs give the activation bit-rate: enough
# for every channel's code histogram (a 32 px feature map gives 1024 values per sample and channel), and
# it bounds both the time (the bit-rate stays below the forward) and the memory of the captured inputs
# (all of a 256-image batch at 224 px would be ~0.7 GB for resnet18).
ACT_ENTROPY_SAMPLES = 64


def _record_first_input(store: dict, name: str, module, args) -> None:
    if name not in store:
        store[name] = args[0][:ACT_ENTROPY_SAMPLES].detach().clone()


def _weight_entropy_bits(ctx, layer: str, w_bits: int) -> float:
    """Entropy of one layer's quantized weights (one code book per output channel), once per Context."""
    key = (layer, w_bits)
    if key not in ctx.weight_entropy:
        ctx.weight_entropy[key] = entropy_bits(ctx.quantizer.quantized_weight(layer, w_bits), ch_axis=0)
    return ctx.weight_entropy[key]


def _entropy_bits(ctx, assignment: dict, first_inputs: dict) -> tuple[float, float]:
    """Element-weighted mean entropy (bits/element) of the quantized weights and quantized inputs."""
    weighted = [
        (_weight_entropy_bits(ctx, l, w), ctx.table.numel[l]) for l, (w, _) in assignment.items() if w is not None
    ]
    acts = [x for l, x in first_inputs.items() if assignment.get(l, (None, None))[1] is not None]
    return _element_weighted(weighted), mean_entropy_bits(acts, ch_axis=1)


def _element_weighted(bits_and_numel: list[tuple[float, int]]) -> float:
    """Mean bits/element of tensors given as (bits/element, elements); 0.0 when there are none."""
    numel = sum(n for _, n in bits_and_numel)
    return sum(h * n for h, n in bits_and_numel) / numel if numel else 0.0


def evaluate_assignment(ctx, assignment: dict, batch_size: int) -> dict:
    """Top-1/top-5/loss on the held-out split with `assignment` applied, plus size, average bits, BitOPs
    and bit-rates.

    Bit-rates (:mod:`mpqflow.quant.entropy`): ``weight_entropy_bits`` is the entropy of the quantized
    weights with one code book per output channel, element-weighted over the layers with quantized
    weights (measured once per Context and (layer, bits)); ``act_entropy_bits`` that of the quantized
    layer inputs, one code book per channel (dim 1), measured on the first ``ACT_ENTROPY_SAMPLES``
    samples of the first evaluation batch (a forward hook after the input quantizer), element-weighted
    over the layers with quantized inputs. Both are 0.0 when nothing of that kind is quantized.
    """
    first_inputs: dict = {}
    modules = dict(ctx.net.named_modules())
    with ctx.quantizer.applied(assignment):
        hooks = [
            modules[l].register_forward_pre_hook(functools.partial(_record_first_input, first_inputs, l))
            for l, (_, a) in assignment.items()
            if a is not None
        ]
        t0 = time.perf_counter()
        try:
            metrics = evaluate(ctx.net, ctx.test_set, batch_size, ctx.device, workers=ctx.workers)
        finally:
            for h in hooks:
                h.remove()
        t1 = time.perf_counter()
        w_entropy, a_entropy = _entropy_bits(ctx, assignment, first_inputs)
        t2 = time.perf_counter()
    log.info("evaluate: %d samples, forward %.2f s, bit-rates %.2f s", metrics["n"], t1 - t0, t2 - t1)
    return _with_size(metrics, ctx.table, assignment, w_entropy, a_entropy)


def _with_size(metrics: dict, table, assignment: dict, w_entropy: float, a_entropy: float) -> dict:
    """The held-out metrics plus size, average bits, BitOPs and bit-rates of `assignment`."""
    bits = table.weight_bits(assignment)
    metrics.update(
        size_mb=bits / 8 / 1e6,
        avg_bits=bits / table.total_numel,
        weight_entropy_bits=w_entropy,
        act_entropy_bits=a_entropy,
        gbitops=table.bitops(assignment) / 1e9,
        assignment={l: list(o) for l, o in assignment.items()},
    )
    return metrics


def _record_first_output(store: dict, name: str, module, args, output) -> None:
    if name not in store:
        store[name] = output[:ACT_ENTROPY_SAMPLES].detach().clone()


@torch.no_grad()
def evaluate_lsq_model(net, table, test_set, batch_size: int, device, workers: int = 0) -> dict:
    """:func:`evaluate_assignment`'s metrics for a model whose layers carry LSQ quantizers
    (:func:`mpqflow.quant.prepare_lsq`, e.g. after fine-tuning); its assignment is the LSQ layers'
    bits (every other layer of the table counts as 32-bit FP)."""
    layers = lsq_layers(net)
    assignment = lsq_assignment(net)
    first_inputs: dict = {}
    hooks = [
        m.act_quant.register_forward_hook(functools.partial(_record_first_output, first_inputs, l))
        for l, m in layers.items()
        if m.act_quant is not None
    ]
    try:
        metrics = evaluate(net.eval(), test_set, batch_size, device, workers=workers)
    finally:
        for h in hooks:
            h.remove()
    weights = [
        (entropy_bits(m.weight_quant(m.weight), ch_axis=0), m.weight.numel())
        for m in layers.values()
        if m.weight_quant is not None
    ]
    a_entropy = mean_entropy_bits(list(first_inputs.values()), ch_axis=1)
    return _with_size(metrics, table, assignment, _element_weighted(weights), a_entropy)


@torch.no_grad()
def assignment_loss(ctx, assignment: dict, indices, batch_size: int) -> float:
    """Mean cross-entropy over training samples `indices` with `assignment` applied."""
    with ctx.quantizer.applied(assignment):
        return evaluate(ctx.net, ctx.train_set, batch_size, ctx.device, indices)["loss"]
