"""Budgets: a bound on model size, BitOPs or latency, parsed from config strings, turned into caps of a Problem.

Usage:
    b = Budget.parse("avg_bits-3.5")          # or Budget("avg_bits", 3.5), or {"avg_bits": 3.5}
    b.name                                    # "avg_bits-3.5" (stable, for file names; parse round-trips)
    size_cap, bitops_cap, latency_cap = b.to_caps(problem)  # totals incl. fixed layers; one is set
    budgets = parse_budgets("avg_bits-4+bitops_rel-0.25")   # several caps at once
    caps_of(budgets, problem)                 # Caps(size_bits, bitops, latency_ms): the tightest of each
    same_caps({"avg_bits-4": (8e6, None, None), "size_rel-0.5": (8e6, None, None)})  # budgets of one cap

Kinds (all caps are totals over the whole quantized model, fixed first/last layers included):
    avg_bits    average weight bits over all quantized weights: size <= value * total numel
    size_mb     weight storage in MB, 1 MB = 10^6 bytes = 8e6 bits (decimal, as `size_mb` in decisions)
    size_rel    fraction of the all-8-bit model size (candidate layers at W8, fixed layers as fixed)
    gbitops     BitOPs in units of 10^9
    bitops_rel  fraction of the all-W8A8 model's BitOPs
    cr          compression ratio against the FP32 model (LIMPQ's constraint): total weight bits, fixed
                layers at their fixed bits and unreached weights at 32, <= 32 * total weights / value.
                So cr-12.2 = avg_bits-(32/12.2); weights are those of Conv2d/Linear layers (no biases,
                no BatchNorm), as LIMPQ counts them.
    latency_ms  the latency table's sum in milliseconds (HAWQ-V3's constraint; mpqflow.deploy.latency:
                fixed layers count where the table has their rows, else the sum is over candidates)
    latency_rel fraction of the all-W8A8 model's table sum (candidates at w8a8, fixed layers as fixed)
The latency kinds need a problem built with a latency table (Problem.latency_ms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "KINDS", "LATENCY_KINDS", "BITS_PER_MB", "UNITS", "Budget", "Caps", "InfeasibleBudget", "NoLatencyTable",
    "parse_budgets",
    "caps_of", "same_caps",
]  # fmt: skip

BITS_PER_MB = 8e6
KINDS = ("avg_bits", "size_mb", "size_rel", "gbitops", "bitops_rel", "cr", "latency_ms", "latency_rel")
_SIZE_KINDS = ("avg_bits", "size_mb", "size_rel", "cr")
LATENCY_KINDS = ("latency_ms", "latency_rel")
UNITS = {
    "avg_bits": "average bits",
    "size_mb": "MB",
    "size_rel": "of the all-8-bit size",
    "gbitops": "GBitOPs",
    "bitops_rel": "of the all-W8A8 BitOPs",
    "cr": "x compression against FP32",
    "latency_ms": "ms",
    "latency_rel": "of the all-W8A8 latency",
}  # how Budget.in_unit's values read
_CAP = {"size": 0, "bitops": 1, "latency": 2}  # each cap's place in Caps


class Caps(NamedTuple):
    """The caps of one or more budgets, totals over the whole model; None where no budget sets one."""

    size_bits: float | None = None
    bitops: float | None = None
    latency_ms: float | None = None


class InfeasibleBudget(ValueError):
    """No decision meets the budget; the message names the smallest achievable size, BitOPs or latency."""


class NoLatencyTable(ValueError):
    """A latency budget on a problem built without a latency table (or latency_rel without w8a8 rows)."""


def _fmt(v: float) -> str:
    """Shortest decimal that round-trips through float()."""
    return np.format_float_positional(float(v), trim="-")


@dataclass(frozen=True)
class Budget:
    """A bound on size, BitOPs or latency.

    Args:
        kind: one of KINDS (avg_bits, size_mb, size_rel, gbitops, bitops_rel, cr, latency_ms, latency_rel).
        value: positive, finite; in the kind's unit.
    """

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown budget kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        try:
            v = float(self.value)
        except (TypeError, ValueError):
            raise ValueError(f"budget value must be a number, got {self.value!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"budget value must be positive and finite, got {self.value!r}")
        object.__setattr__(self, "value", v)

    @property
    def name(self) -> str:
        """Stable file-name form `{kind}-{value}`, e.g. avg_bits-3.5, size_mb-0.12, bitops_rel-0.25."""
        return f"{self.kind}-{_fmt(self.value)}"

    def __str__(self) -> str:
        return self.name

    @property
    def is_size(self) -> bool:
        """True for size budgets (avg_bits, size_mb, size_rel, cr)."""
        return self.kind in _SIZE_KINDS

    @property
    def is_latency(self) -> bool:
        """True for latency budgets (latency_ms, latency_rel)."""
        return self.kind in LATENCY_KINDS

    @property
    def cap_index(self) -> int:
        """Which place of Caps this budget sets: 0 size, 1 BitOPs, 2 latency."""
        return _CAP["size" if self.is_size else "latency" if self.is_latency else "bitops"]

    @classmethod
    def parse(cls, spec) -> Budget:
        """A Budget from "kind-value", {"kind": k, "value": v}, {k: v}, (k, v) or a Budget."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            kind, sep, value = spec.strip().partition("-")
            if not sep or not value:
                raise ValueError(f"budget {spec!r} is not of the form kind-value, e.g. avg_bits-3.5")
            return cls(kind, value)
        if isinstance(spec, dict):
            if set(spec) == {"kind", "value"}:
                return cls(spec["kind"], spec["value"])
            if len(spec) == 1:
                ((kind, value),) = spec.items()
                return cls(kind, value)
            raise ValueError(f"budget dict {spec!r} must be {{'kind': k, 'value': v}} or {{k: v}}")
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            return cls(spec[0], spec[1])
        raise ValueError(f"cannot read a budget from {spec!r}")

    def _reference_latency(self, problem) -> float:
        """The all-W8A8 latency of latency_rel, or NoLatencyTable saying why there is none."""
        self._latency_of(problem)
        if problem.reference_latency_ms is None:
            raise NoLatencyTable(
                f"budget {self.name} is a fraction of the all-W8A8 latency, but the latency table has no w8a8 "
                "row for every candidate layer; add them or use latency_ms"
            )
        return problem.reference_latency_ms

    def _latency_of(self, problem) -> None:
        if problem.latency_ms is None:
            raise NoLatencyTable(
                f"budget {self.name} is a latency budget, but the problem has no per-layer latency table "
                "(config key latency.table)"
            )

    def cap(self, problem) -> float:
        """The cap in bits (size kinds), BitOPs (BitOPs kinds) or ms (latency kinds), total over the model."""
        if self.kind == "latency_ms":
            self._latency_of(problem)
            return self.value
        if self.kind == "latency_rel":
            return self.value * self._reference_latency(problem)
        if self.kind == "avg_bits":
            return self.value * problem.total_numel
        if self.kind == "size_mb":
            return self.value * BITS_PER_MB
        if self.kind == "size_rel":
            return self.value * problem.reference_size_bits
        if self.kind == "cr":
            return 32.0 * problem.total_numel / self.value
        if self.kind == "gbitops":
            return self.value * 1e9
        return self.value * problem.reference_bitops

    def in_unit(self, problem, amount: float) -> float:
        """`amount` (bits, BitOPs or ms, total) expressed in this budget's unit."""
        if self.kind == "latency_ms":
            return amount
        if self.kind == "latency_rel":
            return amount / self._reference_latency(problem)
        if self.kind == "avg_bits":
            return amount / problem.total_numel
        if self.kind == "size_mb":
            return amount / BITS_PER_MB
        if self.kind == "size_rel":
            return amount / problem.reference_size_bits
        if self.kind == "cr":
            return 32.0 * problem.total_numel / amount  # the ratio this amount achieves
        if self.kind == "gbitops":
            return amount / 1e9
        return amount / problem.reference_bitops

    def to_caps(self, problem) -> Caps:
        """Caps with this budget's cap in its place (size, BitOPs or latency), the others None; raises
        InfeasibleBudget below the minimum, NoLatencyTable for a latency budget without a table."""
        cap = self.cap(problem)
        least = (problem.min_size_bits, problem.min_bitops, problem.min_latency_ms)[self.cap_index]()
        if cap < least * (1 - 1e-9):
            raise InfeasibleBudget(self._infeasible_message(problem, least))
        caps = [None, None, None]
        caps[self.cap_index] = cap
        return Caps(*caps)

    def _infeasible_message(self, problem, least: float) -> str:
        unit = UNITS[self.kind]
        head = f"budget {self.name} is infeasible: the smallest achievable "
        if self.kind == "cr":
            return (
                f"budget {self.name} is infeasible: the highest achievable compression ratio is "
                f"{self.in_unit(problem, least):.6g} ({least / BITS_PER_MB:.6g} MB, {least:.0f} bits)"
            )
        if self.is_latency:
            return head + f"latency is {self.in_unit(problem, least):.6g} {unit} ({least:.6g} ms by the latency table)"
        if self.is_size:
            return (
                head + f"size is {self.in_unit(problem, least):.6g} {unit} "
                f"({least / BITS_PER_MB:.6g} MB, {least:.0f} bits)"
            )
        return head + f"BitOPs are {self.in_unit(problem, least):.6g} {unit} ({least / 1e9:.6g} GBitOPs)"


def parse_budgets(spec) -> tuple[Budget, ...]:
    """Several budgets from "a-1+b-2", a list of specs, a single spec or None (no budget)."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        return tuple(Budget.parse(s) for s in spec.split("+"))
    if isinstance(spec, (list, tuple)) and not (len(spec) == 2 and isinstance(spec[0], str) and spec[0] in KINDS):
        return tuple(b for s in spec for b in parse_budgets(s))
    return (Budget.parse(spec),)


def caps_of(budgets, problem) -> Caps:
    """The tightest Caps(size_bits, bitops, latency_ms) of several budgets; InfeasibleBudget below a minimum."""
    tightest = [None, None, None]
    for b in parse_budgets(budgets):
        for i, c in enumerate(b.to_caps(problem)):
            if c is not None and (tightest[i] is None or c < tightest[i]):
                tightest[i] = c
    return Caps(*tightest)


def _whole(cap: float) -> int:
    """The largest whole total a cap admits (sizes and BitOPs are whole numbers of bits), float noise
    of 1e-9 relative forgiven: 4 * numel and 0.5 * (8 * numel) are one cap however they round."""
    return math.floor(cap * (1 + 1e-9))


def _cap_key(caps) -> tuple:
    """(place, the cap as compared): whole bits and BitOPs (_whole); milliseconds are not whole, so
    two latency caps are one when they agree to 12 significant digits (latency_rel-0.5 of 2 ms and
    latency_ms-1)."""
    i, cap = next((i, c) for i, c in enumerate(caps) if c is not None)
    return (i, _whole(cap)) if i < 2 else (i, float(f"{cap:.12g}"))


def same_caps(caps: dict) -> dict:
    """{budget: [the other budgets with the same cap, in the given order]} of {budget: Caps}
    (:meth:`Budget.to_caps`: one cap set each), every budget a key ([] when its cap is its own).

    Budgets of different kinds can resolve to one cap on a model (avg_bits-4 and size_rel-0.5 when every
    weight is in the 8-bit reference); they admit the same decisions, so each is solved and evaluated
    to the same result. The names are only known to be one budget once the layer table is, after the
    DAG is built, so they are noted, not merged.
    """
    keys = {name: _cap_key(c) for name, c in caps.items()}
    return {name: [other for other in caps if other != name and keys[other] == key] for name, key in keys.items()}
