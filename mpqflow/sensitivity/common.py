"""What every estimator shares: option indexing, the per-batch file format and exact pooling.

Usage:
    idx = OptionIndex.from_table(ctx.table)          # i = l*K + k over candidates x options
    idx.assignment(ctx.table.fixed, i, j)            # base (fixed layers) + options i and j
    meta = batch_meta(ctx, "clado", settings)
    save_batch_file("batch_3.npz", payload, meta)    # atomic .npz: payload arrays + meta fields
    pooled = pool_batch_files(["batch_0.npz", "batch_3.npz"])   # sums added, counts added
    save_batch_file("set_2x0.npz", pooled)           # a pooled dict carries its own meta

Payload rules (what makes pooling exact and order-independent):
    `count` (samples) and every key ending in `_sum` are sums over samples: pooling adds them.
    Any other payload key (e.g. hawq's `weight_err`) is a per-file constant that does not depend on
    the samples: pooling checks that all files agree and keeps it.
Meta fields (checked equal before pooling): estimator, layers, options, quant, checkpoint_sha256,
settings (the estimator settings that change numbers), format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..artifacts import (
    FORMAT_VERSION,
    META_FIELDS,
    is_additive,
    load_batch_file,
    means,
    nonfinite_layers,
    pool_batch_files,
    refuse_nonfinite,
    save_batch_file,
    split_meta,
)

__all__ = [
    "FORMAT_VERSION",
    "META_FIELDS",
    "OptionIndex",
    "estimator_settings",
    "batch_meta",
    "sensitivity_meta",
    "split_meta",
    "is_additive",
    "save_batch_file",
    "load_batch_file",
    "pool_batch_files",
    "means",
    "make_context",
    "nonfinite_layers",
    "refuse_nonfinite",
]

# Estimator settings that change the numbers (config keys; their defaults are the schema's); anything
# else (the CLADO engine, chunk sizes, progress bars) is an execution detail and is not recorded.
_NUMERIC_SETTINGS = {
    "clado": (),
    "mpqco": (),
    "hawq": ("hawq_rel_se", "hawq_min_probes", "hawq_max_probes", "hawq_sketch", "hawq_seed"),
}


@dataclass(frozen=True)
class OptionIndex:
    """Binary variables of the search: option i = l*K + k is candidate layer l at options[k].

    Args:
        layers: the L candidate layer names (execution order).
        options: the K (w_bits, a_bits) pairs shared by every candidate layer.
    """

    layers: tuple[str, ...]
    options: tuple[tuple[int, int], ...]

    @classmethod
    def from_table(cls, table) -> OptionIndex:
        """The index of a :class:`mpqflow.layers.LayerTable` (its candidates and option table)."""
        return cls(tuple(table.candidates), tuple(tuple(int(b) for b in o) for o in table.options))

    @property
    def L(self) -> int:
        return len(self.layers)

    @property
    def K(self) -> int:
        return len(self.options)

    @property
    def n(self) -> int:
        return self.L * self.K

    @property
    def layer_of(self) -> np.ndarray:
        """(n,) candidate layer index of each option."""
        return np.repeat(np.arange(self.L), self.K)

    @property
    def option_of(self) -> np.ndarray:
        """(n,) option-table index k of each option."""
        return np.tile(np.arange(self.K), self.L)

    def index(self, l: int, k: int) -> int:
        """Option index of layer l at option-table entry k."""
        return l * self.K + k

    def assignment(self, base: dict, *indices: int) -> dict:
        """`base` (the fixed layers) plus each option index's layer at its (w_bits, a_bits)."""
        out = dict(base)
        for i in indices:
            l, k = divmod(int(i), self.K)
            out[self.layers[l]] = self.options[k]
        return out


def estimator_settings(estimator: str, settings: dict | None) -> dict:
    """The settings of `estimator` that change its numbers, as its file records them (every one
    required; CLADO records its loss: cross_entropy, or the name of a callable `loss_fn`)."""
    if estimator not in _NUMERIC_SETTINGS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {sorted(_NUMERIC_SETTINGS)}")
    settings = settings or {}
    missing = [k for k in _NUMERIC_SETTINGS[estimator] if k not in settings]
    if missing:
        raise ValueError(f"{estimator} settings: missing key(s) {missing} (the config's sensitivity section)")
    out = {k: settings[k] for k in _NUMERIC_SETTINGS[estimator]}
    if estimator == "clado":
        loss_fn = settings.get("loss_fn")
        out["loss"] = getattr(loss_fn, "__name__", "custom") if callable(loss_fn) else "cross_entropy"
    return out


def sensitivity_meta(table, quant: dict, checkpoint_sha256: str, estimator: str, settings: dict) -> dict:
    """The meta fields of a sensitivity file: its estimator and `settings` (as recorded), the layer
    table's candidates and options, the quant section and the checkpoint hash it was made from."""
    return {
        "format": FORMAT_VERSION,
        "estimator": estimator,
        "layers": list(table.candidates),
        "options": np.asarray(table.options, dtype=np.int64).reshape(-1, 2),
        "quant": json.dumps(quant, sort_keys=True),
        "checkpoint_sha256": str(checkpoint_sha256),
        "settings": json.dumps(settings, sort_keys=True),
    }


def batch_meta(ctx, estimator: str, settings: dict | None = None) -> dict:
    """The meta fields of a per-batch file computed on `ctx` (a context.Context)."""
    return sensitivity_meta(
        ctx.table, ctx.quant.to_dict(), ctx.checkpoint_sha256, estimator, estimator_settings(estimator, settings)
    )


def make_context(
    net,
    calib_x,
    w_bits=(2, 4, 8),
    a_bits=(8,),
    *,
    quant: dict | None = None,
    candidates: Sequence[str] | None = None,
    fix_first_last: bool | None = None,
    device=None,
):
    """A calibrated context.Context for an in-memory model (tests, benchmarks; no files involved),
    quantized as given (no BatchNorm folding: fold it first to study a folded model).

    Args:
        net: the model (put in eval mode, moved to `device`).
        calib_x: calibration inputs (B, ...) (also the example that orders the layers).
        w_bits, a_bits: the option table is w_bits x a_bits.
        quant: overrides of the config's quant section (weight/activation schemes ...).
        candidates: keep only these candidate layers searched (others stay FP); default all.
        fix_first_last: first and last layer fixed at 8 bits (None: the schema's quant.fix_first_last).
        device: default the device of net's parameters.
    """
    import dataclasses

    from ..config import QuantConfig
    from ..context import Context, build_quantizer, layer_table
    from ..validation import schema_defaults

    if fix_first_last is None:
        fix_first_last = schema_defaults("quant")["fix_first_last"]
    device = torch_device(net) if device is None else device
    net = net.to(device).eval()
    calib_x = calib_x.to(device)
    q = QuantConfig.from_dict(
        {
            "weight": {"granularity": "per_channel"},
            "activation": {"observer": "ema_minmax", "symmetric": False},
            "w_bits": list(w_bits),
            "a_bits": list(a_bits),
            "fixed_bits": 8,
            "fix_first_last": fix_first_last,
            # the model is quantized as given: a caller who wants it folded folds it first
            # (mpqflow.quant.fold.fold_batchnorm), as the stages do where they load it
            "fold_bn": False,
            "calibration_samples": int(calib_x.shape[0]),
            "calibration_batch_size": int(calib_x.shape[0]),
            **(quant or {}),
        }
    )
    table = layer_table(net, calib_x, q)
    if candidates is not None:
        keep = set(candidates)
        table = dataclasses.replace(table, candidates=tuple(c for c in table.candidates if c in keep))
    quantizer = build_quantizer(net, table, q)
    quantizer.calibrate([calib_x])
    return Context(net, quantizer, table, q, "in-memory", device)


def torch_device(net):
    """The device of a model's first parameter (cpu when it has none)."""
    import torch

    p = next(net.parameters(), None)
    return torch.device("cpu") if p is None else p.device
