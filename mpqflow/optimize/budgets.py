"""Budgets: a bound on model size or BitOPs, parsed from config strings, turned into caps of a Problem.

Usage:
    b = Budget.parse("avg_bits-3.5")          # or Budget("avg_bits", 3.5), or {"avg_bits": 3.5}
    b.name                                    # "avg_bits-3.5" (stable, for file names; parse round-trips)
    size_cap, bitops_cap = b.to_caps(problem) # totals incl. fixed layers; raises InfeasibleBudget
    budgets = parse_budgets("avg_bits-4+bitops_rel-0.25")   # several caps at once
    same_caps({"avg_bits-4": (8e6, None), "size_rel-0.5": (8e6, None)})  # which budgets resolve to one cap

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["KINDS", "BITS_PER_MB", "UNITS", "Budget", "InfeasibleBudget", "parse_budgets", "caps_of", "same_caps"]

BITS_PER_MB = 8e6
KINDS = ("avg_bits", "size_mb", "size_rel", "gbitops", "bitops_rel", "cr")
_SIZE_KINDS = ("avg_bits", "size_mb", "size_rel", "cr")
UNITS = {
    "avg_bits": "average bits",
    "size_mb": "MB",
    "size_rel": "of the all-8-bit size",
    "gbitops": "GBitOPs",
    "bitops_rel": "of the all-W8A8 BitOPs",
    "cr": "x compression against FP32",
}  # how Budget.in_unit's values read


class InfeasibleBudget(ValueError):
    """No decision meets the budget; the message names the smallest achievable size or BitOPs."""


def _fmt(v: float) -> str:
    """Shortest decimal that round-trips through float()."""
    return np.format_float_positional(float(v), trim="-")


@dataclass(frozen=True)
class Budget:
    """A bound on size or BitOPs.

    Args:
        kind: one of KINDS (avg_bits, size_mb, size_rel, gbitops, bitops_rel).
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
        """True for size budgets (avg_bits, size_mb, size_rel, cr), False for BitOPs budgets."""
        return self.kind in _SIZE_KINDS

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

    def cap(self, problem) -> float:
        """The cap in bits (size kinds) or BitOPs (BitOPs kinds), total over the model."""
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
        """`amount` (bits or BitOPs, total) expressed in this budget's unit."""
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

    def to_caps(self, problem) -> tuple[float | None, float | None]:
        """(size_cap_bits, None) or (None, bitops_cap); raises InfeasibleBudget below the minimum."""
        cap = self.cap(problem)
        least = problem.min_size_bits() if self.is_size else problem.min_bitops()
        if cap < least * (1 - 1e-9):
            raise InfeasibleBudget(self._infeasible_message(problem, least))
        return (cap, None) if self.is_size else (None, cap)

    def _infeasible_message(self, problem, least: float) -> str:
        unit = UNITS[self.kind]
        head = f"budget {self.name} is infeasible: the smallest achievable "
        if self.kind == "cr":
            return (
                f"budget {self.name} is infeasible: the highest achievable compression ratio is "
                f"{self.in_unit(problem, least):.6g} ({least / BITS_PER_MB:.6g} MB, {least:.0f} bits)"
            )
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


def caps_of(budgets, problem) -> tuple[float | None, float | None]:
    """The tightest (size_cap_bits, bitops_cap) of several budgets; InfeasibleBudget below a minimum."""
    size_cap = bitops_cap = None
    for b in parse_budgets(budgets):
        s, o = b.to_caps(problem)
        size_cap = s if size_cap is None or (s is not None and s < size_cap) else size_cap
        bitops_cap = o if bitops_cap is None or (o is not None and o < bitops_cap) else bitops_cap
    return size_cap, bitops_cap


def _whole(cap: float) -> int:
    """The largest whole total a cap admits (sizes and BitOPs are whole numbers of bits), float noise
    of 1e-9 relative forgiven: 4 * numel and 0.5 * (8 * numel) are one cap however they round."""
    return math.floor(cap * (1 + 1e-9))


def same_caps(caps: dict) -> dict:
    """{budget: [the other budgets with the same cap, in the given order]} of {budget: (size_cap_bits,
    bitops_cap)} (:meth:`Budget.to_caps`), every budget a key ([] when its cap is its own).

    Budgets of different kinds can resolve to one cap on a model (avg_bits-4 and size_rel-0.5 when every
    weight is in the 8-bit reference); they admit the same decisions, so each is solved and evaluated
    to the same result. The names are only known to be one budget once the layer table is, after the
    DAG is built, so they are noted, not merged.
    """
    keys = {
        name: (0, _whole(size)) if size is not None else (1, _whole(bitops)) for name, (size, bitops) in caps.items()
    }
    return {name: [other for other in caps if other != name and keys[other] == key] for name, key in keys.items()}
