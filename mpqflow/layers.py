"""The layer table: which layers are quantized, which are searched, and what each costs.

Usage:
    table = load_layer_table("results/m/layers.json")   # mpqflow.artifacts: the one reader, which checks it
    table.uniform_assignment((4, 8))          # every candidate at W4A8, fixed layers at their bits
    table.weight_bits(assignment), table.bitops(assignment)

Torch-free (the solve and study stages read it); :func:`mpqflow.context.layer_table` builds one
from a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LayerTable", "TABLE_FIELDS", "table_fault"]

TABLE_FIELDS = ("layers", "candidates", "fixed", "options", "numel", "macs", "unreached", "fold_bn", "folded_bn")


@dataclass(frozen=True)
class LayerTable:
    """Which layers are quantized and what each costs.

    Args:
        layers: every Conv2d/Linear in execution order.
        candidates: the layers whose bit-width is searched.
        fixed: layer -> (w_bits, a_bits) for layers not searched (first/last by default).
        options: the (w_bits, a_bits) option table of every candidate layer.
        numel: weights per layer (of `layers` and of `unreached`); macs: multiply-accumulates per sample
            per layer of `layers`.
        unreached: weights the quantizer cannot reach (used through functional calls); they stay FP and
            count as 32-bit weights in every size (and average bits).
        fold_bn: whether the model was loaded with its BatchNorms folded into the convs (quant.fold_bn).
        folded_bn: conv -> the BatchNorm2d folded into it (empty without fold_bn); a conv's name is
            unchanged by folding, so every other field names the same layers either way.
    """

    layers: tuple[str, ...]
    candidates: tuple[str, ...]
    fixed: dict
    options: tuple[tuple[int, int], ...]
    numel: dict
    macs: dict
    unreached: tuple[str, ...] = ()
    fold_bn: bool = False
    folded_bn: dict = field(default_factory=dict)

    @property
    def unreached_numel(self) -> int:
        """Weights of the unreached layers (0 in tables written before their sizes were recorded)."""
        return sum(self.numel.get(l, 0) for l in self.unreached)

    @property
    def total_numel(self) -> int:
        """Every weight of the model's Conv2d/Linear layers, unreached ones included."""
        return sum(self.numel[l] for l in self.layers) + self.unreached_numel

    def weight_bits(self, assignment: dict) -> int:
        """Total weight storage in bits of a full assignment (FP layers, unreached ones included, count 32 bits)."""
        return (
            sum(self.numel[l] * (assignment.get(l, (32, 32))[0] or 32) for l in self.layers) + 32 * self.unreached_numel
        )

    def bitops(self, assignment: dict) -> int:
        """Sum over layers of MACs * w_bits * a_bits (FP parts count 32 bits)."""
        return sum(
            self.macs[l] * (assignment.get(l, (32, 32))[0] or 32) * (assignment.get(l, (32, 32))[1] or 32)
            for l in self.layers
        )

    def full_assignment(self, candidate_options: dict) -> dict:
        """Candidate choices plus the fixed layers: {layer: (w_bits, a_bits)} over all quantized layers."""
        return {**self.fixed, **candidate_options}

    def uniform_assignment(self, option: tuple[int, int]) -> dict:
        """Every candidate layer at `option`, fixed layers at their fixed bits."""
        return self.full_assignment({l: tuple(option) for l in self.candidates})

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready); ``LayerTable.from_dict(t.to_dict()) == t``."""
        return {
            "layers": list(self.layers),
            "candidates": list(self.candidates),
            "fixed": {k: list(v) for k, v in self.fixed.items()},
            "options": [list(o) for o in self.options],
            "numel": dict(self.numel),
            "macs": dict(self.macs),
            "unreached": list(self.unreached),
            "fold_bn": bool(self.fold_bn),
            "folded_bn": dict(self.folded_bn),
        }

    @classmethod
    def from_dict(cls, t: dict) -> LayerTable:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(t["layers"]),
            tuple(t["candidates"]),
            {k: tuple(v) for k, v in t["fixed"].items()},
            tuple(tuple(o) for o in t["options"]),
            dict(t["numel"]),
            dict(t["macs"]),
            tuple(t.get("unreached", ())),  # absent in tables written before it was recorded
            bool(t["fold_bn"]),
            dict(t["folded_bn"]),
        )


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_option(o) -> bool:
    return isinstance(o, (list, tuple)) and len(o) == 2 and all(b is None or _is_count(b) for b in o)


def table_fault(t) -> str | None:
    """What is wrong with a layer table's plain dict (:meth:`LayerTable.to_dict`), naming the field
    and the layer; None when it is whole. Every field must be present, every layer must have its
    `numel` and `macs` (whole numbers), candidates and fixed layers must be distinct layers of
    `layers`, and every option a (w_bits, a_bits) pair."""
    if not isinstance(t, dict):
        return f"not a layer table (a JSON {type(t).__name__}, expected an object)"
    missing = [f for f in TABLE_FIELDS if f not in t]
    if missing:
        return f"field(s) {missing} missing"
    for f in ("layers", "candidates", "options", "unreached"):
        if not isinstance(t[f], list):
            return f"field {f!r} is a {type(t[f]).__name__}, expected a list"
    if not isinstance(t["fold_bn"], bool):
        return f"field 'fold_bn' is {t['fold_bn']!r}, expected true or false"
    for f in ("fixed", "numel", "macs", "folded_bn"):
        if not isinstance(t[f], dict):
            return f"field {f!r} is a {type(t[f]).__name__}, expected an object keyed by layer"
    layers = t["layers"]
    if len(set(layers)) != len(layers):
        return f"field 'layers' lists {sorted({l for l in layers if layers.count(l) > 1})} more than once"
    for f in ("numel", "macs"):
        for l in layers:
            if l not in t[f]:
                return f"field {f!r} has no entry for layer {l!r}"
            if not _is_count(t[f][l]):
                return f"field {f!r} of layer {l!r} is {t[f][l]!r}, expected a whole number >= 0"
    known = set(layers)
    for f, names in (("candidates", t["candidates"]), ("fixed", list(t["fixed"]))):
        unknown = [l for l in names if l not in known]
        if unknown:
            return f"field {f!r} names {unknown}, not in field 'layers'"
    unfolded = [l for l in t["folded_bn"] if l not in known]
    if unfolded:
        return f"field 'folded_bn' names {unfolded}, not in field 'layers'"
    if t["folded_bn"] and not t["fold_bn"]:
        return "field 'folded_bn' lists folded BatchNorms but field 'fold_bn' is false"
    both = sorted(set(t["candidates"]) & set(t["fixed"]))
    if both:
        return f"layer(s) {both} are both candidates and fixed"
    bad = [o for o in t["options"] if not _is_option(o)] + [v for v in t["fixed"].values() if not _is_option(v)]
    if bad:
        return f"{bad[0]!r} is not a (w_bits, a_bits) pair (fields 'options' and 'fixed')"
    if not t["options"]:
        return "field 'options' is empty"
    return None
