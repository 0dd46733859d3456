"""The integer program of a mixed-precision search: one option per candidate layer, costs per option.

Usage:
    p = Problem(G=G, layer_of=np.repeat(np.arange(L), K), layer_names=names, options=opts * L,
                size_bits=numel_per_option * w_bits, bitops=macs_per_option * w_bits * a_bits,
                fixed_size_bits=..., fixed_bitops=..., numel=numel_per_layer)
    x = p.x_of(choice)            # (n,) 0/1 from one option index per layer
    p.objective(x), p.total_size_bits(x), p.total_bitops(x), p.avg_bits(x)
    p.total_latency_ms(x)         # with latency_ms per option (a latency table), else an error
    p.cap_rows(size_cap, bitops_cap, latency_cap)   # [(cost, fixed, cap)] of the caps that are set

Variables x in {0,1}^n, option i belongs to candidate layer layer_of[i]; exactly one option per layer.
Objective x^T G x + linear . x (either term may be absent, not both).

Caps come in the order (size_cap, bitops_cap, latency_cap) everywhere (budgets.caps_of): totals
over the whole model in bits, BitOPs and milliseconds, None for no cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Problem", "build_problem"]

_SYM_RTOL = 1e-8


def _frozen_array(a, dtype, name: str, shape: tuple) -> np.ndarray:
    """A read-only copy of `a` as `dtype`, checked against `shape` (None = any) and for finiteness."""
    arr = np.array(a, dtype=dtype, copy=True)
    if arr.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, arr.shape)):
        raise ValueError(f"{name} must have shape {tuple('?' if s is None else s for s in shape)}, got {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite entries")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Problem:
    """One option per candidate layer, minimizing x^T G x + linear . x under optional size/BitOPs caps.

    Args:
        layer_of: (n,) candidate layer (0..L-1) of each option; every layer has at least one option.
        layer_names: the L candidate layer names.
        options: the n (w_bits, a_bits) pairs, one per option.
        size_bits: (n,) weight storage of each option in bits (numel * w_bits).
        bitops: (n,) BitOPs of each option (MACs * w_bits * a_bits).
        G: (n, n) symmetric objective matrix, or None. Entries within one layer never contribute
            (x_a x_c = 0 for two options of one layer) except the diagonal (x_a^2 = x_a).
        linear: (n,) linear objective, or None (at least one of G, linear is given).
        fixed_size_bits, fixed_bitops: cost of the layers that are not searched (first/last at 8 bits).
        numel: (L,) weights per candidate layer; default size_bits / w_bits of each layer's first option.
        fixed_numel: weights in the fixed layers; default fixed_size_bits / 8 (fixed layers at 8 bits).
        latency_ms: (n,) each option's latency in ms from a latency table, or None (no latency
            budget can then be set).
        fixed_latency_ms: the fixed layers' latency (0 where the table has no rows for them).
        reference_latency_ms: the all-W8A8 model's latency, the reference of latency_rel; None
            where the table has no w8a8 rows.
    """

    layer_of: np.ndarray
    layer_names: list
    options: list
    size_bits: np.ndarray
    bitops: np.ndarray
    G: np.ndarray | None = None
    linear: np.ndarray | None = None
    fixed_size_bits: float = 0.0
    fixed_bitops: float = 0.0
    numel: np.ndarray | None = None
    fixed_numel: float | None = None
    latency_ms: np.ndarray | None = None
    fixed_latency_ms: float = 0.0
    reference_latency_ms: float | None = None
    layers: tuple = field(init=False, repr=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        layer_of = _frozen_array(self.layer_of, np.int64, "layer_of", (None,))
        n = layer_of.size
        if n == 0:
            raise ValueError("a problem needs at least one option")
        L = int(layer_of.max()) + 1
        if layer_of.min() < 0 or np.unique(layer_of).size != L:
            raise ValueError(f"layer_of must use every layer index 0..{L - 1} (each layer needs >= 1 option)")
        set_("layer_of", layer_of)
        set_("layers", tuple(np.flatnonzero(layer_of == l) for l in range(L)))
        if len(self.layer_names) != L:
            raise ValueError(f"layer_names has {len(self.layer_names)} names for {L} layers")
        set_("layer_names", [str(s) for s in self.layer_names])
        if len(self.options) != n:
            raise ValueError(f"options has {len(self.options)} entries for {n} options")
        opts = [tuple(int(b) for b in o) for o in self.options]
        if any(len(o) != 2 or min(o) <= 0 for o in opts):
            raise ValueError("every option must be a (w_bits, a_bits) pair of positive ints")
        set_("options", opts)
        for name in ("size_bits", "bitops"):
            arr = _frozen_array(getattr(self, name), np.float64, name, (n,))
            if np.any(arr < 0):
                raise ValueError(f"{name} must be non-negative")
            set_(name, arr)
        self._check_objective(n)
        self._check_latency(n)
        for name in ("fixed_size_bits", "fixed_bitops"):
            v = float(getattr(self, name))
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and non-negative, got {v}")
            set_(name, v)
        w_bits = np.array([o[0] for o in opts], float)
        numel = (
            self.size_bits[[ix[0] for ix in self.layers]] / w_bits[[ix[0] for ix in self.layers]]
            if self.numel is None
            else self.numel
        )
        numel = _frozen_array(numel, np.float64, "numel", (L,))
        if np.any(numel <= 0):
            raise ValueError("numel must be positive")
        set_("numel", numel)
        fixed_numel = self.fixed_size_bits / 8.0 if self.fixed_numel is None else float(self.fixed_numel)
        if not np.isfinite(fixed_numel) or fixed_numel < 0:
            raise ValueError(f"fixed_numel must be finite and non-negative, got {fixed_numel}")
        set_("fixed_numel", fixed_numel)

    def _check_latency(self, n: int) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.latency_ms is not None:
            arr = _frozen_array(self.latency_ms, np.float64, "latency_ms", (n,))
            if np.any(arr <= 0):
                raise ValueError("latency_ms must be positive")
            set_("latency_ms", arr)
        v = float(self.fixed_latency_ms)
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"fixed_latency_ms must be finite and non-negative, got {v}")
        set_("fixed_latency_ms", v)
        if self.reference_latency_ms is not None:
            r = float(self.reference_latency_ms)
            if not np.isfinite(r) or r <= 0:
                raise ValueError(f"reference_latency_ms must be finite and positive, got {r}")
            set_("reference_latency_ms", r)

    def _check_objective(self, n: int) -> None:
        if self.G is None and self.linear is None:
            raise ValueError("give G (quadratic objective) or linear (linear objective)")
        if self.G is not None:
            G = _frozen_array(self.G, np.float64, "G", (n, n))
            scale = max(float(np.abs(G).max()), 1e-300)
            if np.abs(G - G.T).max() > _SYM_RTOL * scale:
                raise ValueError("G must be symmetric")
            G = np.array((G + G.T) / 2)
            G.setflags(write=False)
            object.__setattr__(self, "G", G)
        if self.linear is not None:
            object.__setattr__(self, "linear", _frozen_array(self.linear, np.float64, "linear", (n,)))

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of binary variables (options over all layers)."""
        return int(self.layer_of.size)

    @property
    def L(self) -> int:
        """Number of candidate layers."""
        return len(self.layers)

    @property
    def is_linear(self) -> bool:
        """True when the objective has no quadratic part (or G is diagonal)."""
        if self.G is None:
            return True
        return not np.any(self.G[self.layer_of[:, None] != self.layer_of[None, :]])

    def linear_terms(self) -> np.ndarray:
        """(n,) linear objective equivalent on feasible x when is_linear: diag(G) + linear."""
        c = np.zeros(self.n) if self.linear is None else self.linear.copy()
        return c + (0.0 if self.G is None else np.diag(self.G))

    # ---- costs and objective of a decision ------------------------------------------------------
    def x_of(self, choice) -> np.ndarray:
        """(n,) 0/1 vector from `choice`, one option index (global, 0..n-1) per layer."""
        choice = np.asarray(choice, dtype=np.int64)
        if choice.shape != (self.L,) or np.any(self.layer_of[choice] != np.arange(self.L)):
            raise ValueError("choice must hold one option index of each layer, in layer order")
        x = np.zeros(self.n, dtype=np.int64)
        x[choice] = 1
        return x

    def choice_of(self, x) -> np.ndarray:
        """(L,) the chosen option index of each layer from a one-hot (n,) 0/1 vector."""
        x = np.asarray(x)
        if not self.is_one_hot(x):
            raise ValueError("x is not one-hot per layer")
        return np.array([ix[np.argmax(x[ix])] for ix in self.layers], dtype=np.int64)

    def is_one_hot(self, x) -> bool:
        """True when x is 0/1 with exactly one option per layer."""
        x = np.asarray(x)
        return (
            x.shape == (self.n,)
            and bool(np.all((x == 0) | (x == 1)))
            and bool(np.all(np.bincount(self.layer_of, weights=x, minlength=self.L) == 1))
        )

    def objective(self, x) -> float:
        """x^T G x + linear . x."""
        x = np.asarray(x, dtype=np.float64)
        val = 0.0 if self.G is None else float(x @ self.G @ x)
        return val + (0.0 if self.linear is None else float(self.linear @ x))

    def total_size_bits(self, x) -> float:
        """Weight storage of the whole model in bits (fixed layers included)."""
        return self.fixed_size_bits + float(self.size_bits @ np.asarray(x, np.float64))

    def total_bitops(self, x) -> float:
        """BitOPs of the whole model (fixed layers included)."""
        return self.fixed_bitops + float(self.bitops @ np.asarray(x, np.float64))

    def total_latency_ms(self, x) -> float:
        """The latency table's sum for this decision in ms (fixed layers as the table counts them)."""
        return self.fixed_latency_ms + float(self._latency() @ np.asarray(x, np.float64))

    def _latency(self) -> np.ndarray:
        if self.latency_ms is None:
            raise ValueError("this problem has no latency table (latency_ms), so no latency total or cap")
        return self.latency_ms

    def cap_rows(self, size_cap=None, bitops_cap=None, latency_cap=None) -> list:
        """[(cost (n,), fixed total, cap)] of each cap that is set, in the order size, BitOPs, latency:
        the linear constraints cost . x <= cap - fixed that every back-end adds."""
        rows = [(self.size_bits, self.fixed_size_bits, size_cap), (self.bitops, self.fixed_bitops, bitops_cap)]
        if latency_cap is not None:
            rows.append((self._latency(), self.fixed_latency_ms, latency_cap))
        return [(cost, fixed, cap) for cost, fixed, cap in rows if cap is not None]

    def avg_bits(self, x) -> float:
        """Average weight bits over all quantized weights (fixed layers included)."""
        return self.total_size_bits(x) / self.total_numel

    def is_feasible(self, x, size_cap=None, bitops_cap=None, latency_cap=None) -> bool:
        """One-hot and within every cap (totals, fixed layers included; relative tolerance 1e-9)."""
        if not self.is_one_hot(x):
            return False
        xf = np.asarray(x, np.float64)
        return all(
            fixed + float(cost @ xf) <= cap * (1 + 1e-9)
            for cost, fixed, cap in self.cap_rows(size_cap, bitops_cap, latency_cap)
        )

    # ---- reference points -----------------------------------------------------------------------
    @property
    def total_numel(self) -> float:
        """Weights in all quantized layers (candidates and fixed)."""
        return float(self.numel.sum()) + self.fixed_numel

    @property
    def macs(self) -> np.ndarray:
        """(L,) MACs per candidate layer, recovered as bitops / (w_bits * a_bits) of its first option."""
        first = [ix[0] for ix in self.layers]
        wa = np.array([self.options[i][0] * self.options[i][1] for i in first], float)
        return self.bitops[first] / wa

    @property
    def reference_size_bits(self) -> float:
        """Size of the all-8-bit model: candidate layers at W8, fixed layers as fixed."""
        return self.fixed_size_bits + 8.0 * float(self.numel.sum())

    @property
    def reference_bitops(self) -> float:
        """BitOPs of the all-W8A8 model: candidate layers at W8A8, fixed layers as fixed."""
        return self.fixed_bitops + 64.0 * float(self.macs.sum())

    def min_size_bits(self) -> float:
        """Smallest achievable total size in bits (cheapest option of every layer)."""
        return self.fixed_size_bits + float(sum(self.size_bits[ix].min() for ix in self.layers))

    def min_bitops(self) -> float:
        """Smallest achievable total BitOPs (cheapest option of every layer)."""
        return self.fixed_bitops + float(sum(self.bitops[ix].min() for ix in self.layers))

    def min_latency_ms(self) -> float:
        """Smallest achievable total latency in ms (fastest option of every layer)."""
        lat = self._latency()
        return self.fixed_latency_ms + float(sum(lat[ix].min() for ix in self.layers))

    def min_both(self, size_cap=None, bitops_cap=None, latency_cap=None) -> np.ndarray | None:
        """A decision within every cap if the per-layer cheapest choices show one exists cheaply, else None.

        Tries the smallest-size, the smallest-BitOPs and (with a latency cap) the fastest choices, ties
        broken by the other costs (exact when only one cap is set).
        """
        costs = [self.size_bits, self.bitops] + ([self._latency()] if latency_cap is not None else [])
        for cost in costs:
            tie = self.bitops + self.size_bits  # a cheaper choice on the other costs first
            x = self.x_of([ix[np.lexsort((tie[ix], cost[ix]))[0]] for ix in self.layers])
            if self.is_feasible(x, size_cap, bitops_cap, latency_cap):
                return x
        return None


def build_problem(table, G=None, linear=None, allowed=None, latency=None) -> Problem:
    """The integer program of an objective xᵀGx + linear·x over a layer table (:class:`mpqflow.layers.LayerTable`:
    candidates, options, numel, macs, fixed, unreached_numel): one option per
    candidate layer, each option's size and BitOPs, the fixed layers' totals.

    `allowed`: (n,) bool over the table's options (option i = l*K + k); the others are left out of the
    problem (G, linear and the problem's options are then over the allowed ones only).

    `latency`: a :class:`mpqflow.deploy.latency.LatencyTable` that fits the layer table, or None; it
    gives every option its latency (the latency budgets' costs)."""
    K = len(table.options)
    keep = np.ones(len(table.candidates) * K, bool) if allowed is None else np.asarray(allowed, bool)
    sub = (lambda a: a) if allowed is None else (lambda a: None if a is None else np.asarray(a)[keep])
    costs = None
    if latency is not None:
        from ..deploy.latency import latency_costs

        costs = latency_costs(latency, table)
    return Problem(
        G=None if G is None else (G if allowed is None else np.asarray(G)[np.ix_(keep, keep)]),
        linear=sub(linear),
        layer_of=np.repeat(np.arange(len(table.candidates)), K)[keep],
        layer_names=list(table.candidates),
        options=[o for o, k in zip([tuple(o) for o in table.options] * len(table.candidates), keep) if k],
        size_bits=np.array([table.numel[l] * w for l in table.candidates for w, _ in table.options], float)[keep],
        bitops=np.array([table.macs[l] * w * a for l in table.candidates for w, a in table.options], float)[keep],
        # unreached weights stay FP: 32 bits each, in every size and average-bits budget
        fixed_size_bits=float(
            sum(table.numel[l] * w for l, (w, _) in table.fixed.items()) + 32 * table.unreached_numel
        ),
        fixed_bitops=float(sum(table.macs[l] * w * a for l, (w, a) in table.fixed.items())),
        numel=np.array([table.numel[l] for l in table.candidates], float),
        fixed_numel=float(sum(table.numel[l] for l in table.fixed) + table.unreached_numel),
        latency_ms=None if costs is None else np.array(costs.per_option, float)[keep],
        fixed_latency_ms=0.0 if costs is None else costs.fixed_ms,
        reference_latency_ms=None if costs is None else costs.reference_ms,
    )
