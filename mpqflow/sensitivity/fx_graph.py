"""A traced model as a list of nodes that can be re-run selectively on top of cached values.

Usage:
    g = FxGraph(net, layers)          # NotTraceable when torch.fx cannot trace it
    env = g.run(x)                    # every node's value (the cache)
    g.down[l]                         # the nodes downstream of layer l: what a perturbation re-runs

The engine (:mod:`.fx_engine`) builds the CLADO passes on it. In-place ops (ReLU(inplace=True),
`+=`) get a copy of their mutated input, so cached values stay.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn as nn

__all__ = ["FxGraph", "NotTraceable"]

_MISSING = object()
_INPLACE_FUNCTIONS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
    operator.setitem,
}


class NotTraceable(RuntimeError):
    """torch.fx cannot trace the model, or a layer is not called as a module of the traced graph."""


def _fetch_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _materialize(a, lookup):
    """Replace fx Nodes inside (nested) args by their values."""
    if isinstance(a, torch.fx.Node):
        return lookup(a)
    if isinstance(a, tuple):
        return tuple(_materialize(v, lookup) for v in a)
    if isinstance(a, list):
        return [_materialize(v, lookup) for v in a]
    if isinstance(a, dict):
        return {k: _materialize(v, lookup) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_materialize(a.start, lookup), _materialize(a.stop, lookup), _materialize(a.step, lookup))
    return a


class FxGraph:
    """A traced model as a list of nodes that can be re-run selectively on top of cached values.

    Args:
        net: the model; call_module nodes call net's own submodules (hooks and weight swaps apply).
        layers: module names whose perturbation is studied; each must be a call_module target.

    Raises NotTraceable when tracing fails or a layer is not called as a module.
    """

    def __init__(self, net: nn.Module, layers: Sequence[str]):
        try:
            gm = torch.fx.symbolic_trace(net)
        except Exception as err:  # noqa: BLE001 -- any tracing failure means: use the reference
            raise NotTraceable(f"torch.fx cannot trace {type(net).__name__}: {type(err).__name__}: {err}") from err
        self.net = net
        self.nodes = list(gm.graph.nodes)
        self.pos = {n: p for p, n in enumerate(self.nodes)}
        self.output = next(n for n in self.nodes if n.op == "output")
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        modules = dict(net.named_modules())
        self._module = {n: modules[n.target] for n in self.nodes if n.op == "call_module"}
        self._mutates = {n: self._is_inplace(n) for n in self.nodes}
        self.layer_nodes: dict[str, list] = {}
        for l in layers:
            found = [n for n in self.nodes if n.op == "call_module" and n.target == l]
            if not found:
                raise NotTraceable(f"layer {l!r} is not called as a module in the traced graph")
            self.layer_nodes[l] = found
        self.down = {l: self._downstream(found) for l, found in self.layer_nodes.items()}

    def _is_inplace(self, n: torch.fx.Node) -> bool:
        if n.op == "call_module":
            return getattr(self._module[n], "inplace", False) is True
        if n.op == "call_function":
            name = getattr(n.target, "__name__", "")
            return (
                n.target in _INPLACE_FUNCTIONS
                or n.kwargs.get("inplace", False) is True
                or (name.endswith("_") and not name.endswith("__"))
            )
        if n.op == "call_method":
            return n.target.endswith("_") and not n.target.endswith("__")
        return False

    def _downstream(self, start: list) -> list:
        """Nodes that depend on any node in `start` (start included), in execution order."""
        dirty = set(start)
        for n in self.nodes[self.pos[start[0]] :]:
            if n not in dirty and any(a in dirty for a in n.all_input_nodes):
                dirty.add(n)
        return [n for n in self.nodes if n in dirty]

    def run_node(self, n: torch.fx.Node, lookup):
        """Value of node n with its inputs taken from lookup(node)."""
        args = _materialize(n.args, lookup)
        kwargs = _materialize(n.kwargs, lookup)
        if self._mutates[n] and args and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(),) + tuple(args[1:])  # never mutate a cached value
        op = n.op
        if op == "call_module":
            return self._module[n](*args, **kwargs)
        if op == "call_function":
            return n.target(*args, **kwargs)
        if op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if op == "get_attr":
            return _fetch_attr(self.net, n.target)
        if op == "output":
            return args[0]
        raise RuntimeError(f"unexpected fx node op {op!r}")

    def run_all(self, x: torch.Tensor) -> dict:
        """Run every node on input x; returns {node: value}."""
        if len(self.placeholders) != 1:
            raise NotTraceable(f"the traced model takes {len(self.placeholders)} inputs, expected 1")
        env = {self.placeholders[0]: x}
        for n in self.nodes:
            if n.op != "placeholder":
                env[n] = self.run_node(n, env.__getitem__)
        return env

    def free_plan(self, run: list, keep: set = frozenset()) -> list:
        """For each position of `run`, the nodes whose values are no longer needed after it."""
        last = {}
        for p, n in enumerate(run):
            for a in n.all_input_nodes:
                last[a] = p
        free = [[] for _ in run]
        for a, p in last.items():
            if a not in keep and a is not self.output:
                free[p].append(a)
        return free


# ---------------------------------------------------------------------------------------- fast engine


def _chain_get(chain: list, a):
    for c in chain:
        v = c.get(a, _MISSING)
        if v is not _MISSING:
            return v
    raise KeyError(f"no cached value for fx node {a.name}")


class _Runner:
    """Re-runs node lists on top of a chain of caches, optionally on M perturbations stacked in the batch."""

    def __init__(self, g: FxGraph, batch_nodes: set, B: int):
        self.g, self.batch_nodes, self.B = g, batch_nodes, B

    def run(self, run: list, chain: list, free: list | None = None, M: int = 1, first=None) -> dict:
        """Values of the nodes of `run` (in order). Values of other nodes come from `chain` (dicts,
        searched in order); with M > 1 batch-carrying values from the chain are repeated M times.
        `first`, if given, computes the first node of `run` itself (a stacked (M*B, ...) value)."""
        env: dict = {}
        g, bn = self.g, self.batch_nodes

        def lookup(a):
            v = env.get(a, _MISSING)
            if v is not _MISSING:
                return v
            v = _chain_get(chain, a)
            if M > 1 and a in bn:
                v = env[a] = v.repeat((M,) + (1,) * (v.dim() - 1))  # (M*B, ...)
            return v

        for p, n in enumerate(run):
            env[n] = first(lookup) if (p == 0 and first is not None) else g.run_node(n, lookup)
            if free is not None:
                for a in free[p]:
                    env.pop(a, None)
        env["__lookup__"] = lookup
        return env

    def output(self, env: dict):
        """The model output after a run (from the run or, if untouched, from the chain)."""
        return env["__lookup__"](self.g.output)


def _batch_nodes(g: FxGraph, x: torch.Tensor) -> set:
    """Nodes whose value is a tensor with the batch along dim 0 (found by running batches of 1 and 2)."""
    if x.shape[0] < 2:
        return set()
    e1, e2 = g.run_all(x[:1]), g.run_all(x[:2])
    out = set()
    for n in g.nodes:
        a, b = e1.get(n), e2.get(n)
        if (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dim() >= 1
            and b.dim() == a.dim()
            and a.shape[0] == 1
            and b.shape[0] == 2
            and a.shape[1:] == b.shape[1:]
        ):
            out.add(n)
    return out
