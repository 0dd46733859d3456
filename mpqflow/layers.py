"""The layer table: which layers are quantized, which are searched, and what each costs.

Usage:
    table = LayerTable.from_dict(load_json("results/m/layers.json"))
    table.uniform_assignment((4, 8))          # every candidate at W4A8, fixed layers at their bits
    table.weight_bits(assignment), table.bitops(assignment)

Torch-free (the solve and study stages read it); :func:`mpqflow.context.layer_table` builds one
from a model.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerTable"]


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
    """

    layers: tuple[str, ...]
    candidates: tuple[str, ...]
    fixed: dict
    options: tuple[tuple[int, int], ...]
    numel: dict
    macs: dict
    unreached: tuple[str, ...] = ()

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
        )
