"""Pairwise perturbation engines: every single and pairwise perturbation of L layers x K options.

Usage:
    res = pairwise_fx(net, x, layers, K, activate, make_head)          # fast (torch.fx caching)
    res = pairwise_reference(net, x, layers, K, activate, make_head)   # one full forward per pass
    res.base (m,), res.single (n, m), res.pair (n, n, m)                # float64 numpy, n = L*K

The model's state is driven entirely by callbacks, so the engines know nothing about quantization:
    activate({l: k, ...})   puts layer index l at option k (every other layer at its base state)
    make_head(base_out)     returns head(out, M) -> (M, m) float64 tensor of statistics of the M
                            perturbations stacked along the batch dimension of `out` (M*B, ...)
Pairs (i, j) exist only for options of different layers; pair[i, j] == pair[j, i].

The fast engine traces the model with torch.fx (leaf modules are still called as modules, so
forward-pre-hooks and weight swaps apply), runs the base forward once and caches every node's value.
A perturbation of layer l re-runs only the nodes downstream of l (`down[l]`), reading everything
else from the cache. For pairs, the outer option i's downstream is run once and kept (cache_i);
every option j of a layer later in the order then re-runs only down[layer(j)] on top of cache_i.
The K options of the inner layer can be stacked along the batch dimension (the layer is called K
times, the rest of its downstream once on K*B samples); each inner layer checks the stacked result
against an unstacked run once and falls back to unstacked when they disagree or stacking fails.
In-place ops (ReLU(inplace=True), `+=`) get a copy of their mutated input, so cached values stay.
A model torch.fx cannot trace falls back to the reference engine with a logged warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.fx
import torch.nn as nn
from tqdm.auto import tqdm

from .fx_graph import FxGraph, NotTraceable, _batch_nodes, _chain_get, _materialize, _Runner

__all__ = ["PairwiseResult", "FxGraph", "NotTraceable", "pairwise_fx", "pairwise_reference", "pair_count"]

log = logging.getLogger("mpqflow")
Activate = Callable[[dict], None]
MakeHead = Callable[[torch.Tensor], Callable[[torch.Tensor, int], torch.Tensor]]


class PairwiseResult(NamedTuple):
    """Statistics of the base pass, every single perturbation and every cross-layer pair (float64)."""

    base: np.ndarray  # (m,)
    single: np.ndarray  # (n, m)
    pair: np.ndarray  # (n, n, m), symmetric, zero within a layer


def pair_count(L: int, K: int) -> int:
    """Number of cross-layer option pairs: K^2 * L(L-1)/2."""
    return K * K * L * (L - 1) // 2


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and "out" in out:
        return out["out"]
    raise TypeError(f"model output of type {type(out).__name__} is not a tensor of logits")


# ---------------------------------------------------------------------------------------- reference


@torch.no_grad()
def pairwise_reference(
    net: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    K: int,
    activate: Activate,
    make_head: MakeHead,
    progress: bool = True,
) -> PairwiseResult:
    """One full forward pass per perturbation: 1 + L*K + pair_count(L, K) passes.

    Args:
        net: the model (eval mode).
        x: (B, ...) input batch on the model's device.
        layers: the L perturbed layers (their order only orders the loops).
        K: options per layer.
        activate: callback {layer index: option} -> model state (see the module docstring).
        make_head: callback base output -> head(out, M) -> (M, m) statistics.
        progress: show a tqdm bar over pairs.
    """
    L = len(layers)
    activate({})
    base_out = _logits(net(x))
    head = make_head(base_out)
    base = head(base_out, 1)[0]
    single = base.new_zeros(L * K, base.numel())
    pair = base.new_zeros(L * K, L * K, base.numel())
    for l in range(L):
        for k in range(K):
            activate({l: k})
            single[l * K + k] = head(_logits(net(x)), 1)[0]
    t0 = time.perf_counter()
    bar = tqdm(
        total=pair_count(L, K), desc="clado pairs (reference)", unit="pair", disable=not progress, mininterval=2.0
    )
    for la in range(L):
        for ka in range(K):
            for lb in range(la + 1, L):
                for kb in range(K):
                    activate({la: ka, lb: kb})
                    i, j = la * K + ka, lb * K + kb
                    pair[i, j] = pair[j, i] = head(_logits(net(x)), 1)[0]
                bar.update(K)
    bar.close()
    activate({})
    _log_rate("reference", pair_count(L, K), time.perf_counter() - t0)
    return PairwiseResult(*(t.cpu().numpy() for t in (base, single, pair)))


def _log_rate(engine: str, pairs: int, seconds: float) -> None:
    log.info("clado %s engine: %d pairs in %.2f s (%.1f pairs/s)", engine, pairs, seconds, pairs / max(seconds, 1e-9))


@torch.no_grad()
def pairwise_fx(
    net: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    K: int,
    activate: Activate,
    make_head: MakeHead,
    stack: bool = True,
    progress: bool = True,
    max_stack_samples: int = 4096,
) -> PairwiseResult:
    """Same numbers as :func:`pairwise_reference` (up to float rounding), re-running only dirty nodes.

    Args:
        net, x, layers, K, activate, make_head, progress: as in :func:`pairwise_reference`.
        stack: stack the K options of an inner layer along the batch dimension where it checks out.
        max_stack_samples: stack at most this many samples (K' * B) per run (memory bound).

    Falls back to :func:`pairwise_reference` (logged warning) when the model is not fx-traceable.
    """
    try:
        g = FxGraph(net, layers)
    except NotTraceable as err:
        log.warning("fast CLADO engine unavailable, using the reference engine: %s", err)
        return pairwise_reference(net, x, layers, K, activate, make_head, progress)
    L, B = len(layers), x.shape[0]
    activate({})
    base_env = g.run_all(x)
    head = make_head(_logits(base_env[g.output]))
    base = head(_logits(base_env[g.output]), 1)[0]
    m = base.numel()
    single = base.new_zeros(L * K, m)
    pair = base.new_zeros(L * K, L * K, m)
    # Outer layers first: the layer with the larger downstream keeps its cache, the other re-runs.
    order = sorted(range(L), key=lambda l: (-len(g.down[layers[l]]), l))
    runner = _Runner(g, _batch_nodes(g, x) if stack and K > 1 else set(), B)
    per_run = max(1, min(K, max_stack_samples // max(B, 1)))
    stackable = {l: bool(runner.batch_nodes) and per_run > 1 and len(g.layer_nodes[layers[l]]) == 1 for l in range(L)}
    checked: set = set()
    inner_plan = {}
    for r, l in enumerate(order):
        later = order[r + 1 :]
        run = g.down[layers[l]]
        needed = {a for lb in later for n in g.down[layers[lb]] for a in n.all_input_nodes} | {g.output}
        inner_plan[l] = (run, g.free_plan(run, keep=needed))
    t0 = time.perf_counter()
    bar = tqdm(total=pair_count(L, K), desc="clado pairs (fast)", unit="pair", disable=not progress, mininterval=2.0)
    for r, la in enumerate(order):
        run_a, keep_free_a = inner_plan[la]
        for ka in range(K):
            activate({la: ka})
            cache = runner.run(run_a, [base_env], keep_free_a)
            i = la * K + ka
            single[i] = head(_logits(runner.output(cache)), 1)[0]
            for lb in order[r + 1 :]:
                stats = _inner(
                    runner, g, layers, K, la, ka, lb, cache, base_env, head, activate, stackable, checked, per_run
                )
                js = [lb * K + kb for kb in range(K)]
                pair[i, js] = stats
                pair[js, i] = stats
                bar.update(K)
    bar.close()
    activate({})
    _log_rate("fast", pair_count(L, K), time.perf_counter() - t0)
    return PairwiseResult(*(t.cpu().numpy() for t in (base, single, pair)))


def _inner(runner, g, layers, K, la, ka, lb, cache, base_env, head, activate, stackable, checked, per_run):
    """(K, m) statistics of the pairs (la at ka, lb at every option): down[lb] on top of cache_a."""
    run = g.down[layers[lb]]
    chain = [cache, base_env]
    if stackable[lb]:
        try:
            stacked = _stacked(runner, g, run, chain, layers[lb], K, la, ka, lb, head, activate, per_run)
        except Exception as err:  # noqa: BLE001 -- any failure: this layer runs unstacked
            log.info(
                "fx engine: stacking options of %s failed (%s: %s); running it unstacked",
                layers[lb],
                type(err).__name__,
                err,
            )
            stackable[lb] = False
        else:
            if lb in checked:
                return stacked
            plain = _unstacked(runner, g, run, chain, K, la, ka, lb, head, activate)
            checked.add(lb)
            scale = plain.abs().max().clamp_min(1.0)
            if (stacked - plain).abs().max() <= 1e-5 * scale:
                return plain
            log.info(
                "fx engine: stacked options of %s disagree with the unstacked run (max diff %.3g); "
                "running it unstacked",
                layers[lb],
                float((stacked - plain).abs().max()),
            )
            stackable[lb] = False
            return plain
    return _unstacked(runner, g, run, chain, K, la, ka, lb, head, activate)


def _unstacked(runner, g, run, chain, K, la, ka, lb, head, activate):
    free = g.free_plan(run)
    out = []
    for kb in range(K):
        activate({la: ka, lb: kb})
        env = runner.run(run, chain, free)
        out.append(head(_logits(runner.output(env)), 1)[0])
    return torch.stack(out)


def _stacked(runner, g, run, chain, layer, K, la, ka, lb, head, activate, per_run):
    node = g.layer_nodes[layer][0]
    assert run[0] is node
    free = g.free_plan(run)
    module = g._module[node]
    out = []
    for k0 in range(0, K, per_run):
        ks = range(k0, min(K, k0 + per_run))

        def first(lookup, ks=ks):
            # the perturbed layer itself, once per option on its unstacked (B, ...) input
            args = _materialize(node.args, lambda a: _chain_get(chain, a))
            kwargs = _materialize(node.kwargs, lambda a: _chain_get(chain, a))
            outs = []
            for kb in ks:
                activate({la: ka, lb: kb})
                outs.append(module(*args, **kwargs))
            return torch.cat(outs)  # (M*B, ...)

        env = runner.run(run, chain, free, M=len(ks), first=first)
        out.append(head(_logits(runner.output(env)), len(ks)))
    return torch.cat(out)
