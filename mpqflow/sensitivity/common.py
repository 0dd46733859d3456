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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import load_npz, save_npz

__all__ = [
    "FORMAT_VERSION",
    "META_FIELDS",
    "OptionIndex",
    "estimator_settings",
    "batch_meta",
    "split_meta",
    "is_additive",
    "save_batch_file",
    "load_batch_file",
    "pool_batch_files",
    "means",
    "make_context",
]

FORMAT_VERSION = 1
META_FIELDS = ("format", "estimator", "layers", "options", "quant", "checkpoint_sha256", "settings")
_CONST_RTOL = 1e-6  # per-file constants (e.g. weight errors) may differ by float noise across devices

# Estimator settings that change the numbers (and their defaults); anything else (the CLADO engine,
# chunk sizes, progress bars) is an execution detail and is not recorded.
_NUMERIC_SETTINGS = {
    "clado": {"loss": "cross_entropy"},
    "mpqco": {},
    "hawq": {"hawq_max_probes": 100, "hawq_tol": 1e-3, "hawq_seed": 0},
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
        """The index of a pipeline.LayerTable (its candidates and option table)."""
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
    """The settings of `estimator` that change its numbers, defaults filled in."""
    if estimator not in _NUMERIC_SETTINGS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {sorted(_NUMERIC_SETTINGS)}")
    settings = settings or {}
    out = {k: settings.get(k, v) for k, v in _NUMERIC_SETTINGS[estimator].items()}
    if estimator == "clado" and callable(settings.get("loss_fn")):
        out["loss"] = getattr(settings["loss_fn"], "__name__", "custom")
    return out


def batch_meta(ctx, estimator: str, settings: dict | None = None) -> dict:
    """The meta fields of a per-batch file computed on `ctx` (a pipeline.Context)."""
    return {
        "format": FORMAT_VERSION,
        "estimator": estimator,
        "layers": list(ctx.table.candidates),
        "options": np.asarray(ctx.table.options, dtype=np.int64).reshape(-1, 2),
        "quant": json.dumps(ctx.cfg["quant"], sort_keys=True),
        "checkpoint_sha256": str(ctx.checkpoint_sha256),
        "settings": json.dumps(estimator_settings(estimator, settings), sort_keys=True),
    }


def split_meta(data: dict) -> tuple[dict, dict]:
    """(payload, meta) of a loaded or pooled dict."""
    return ({k: v for k, v in data.items() if k not in META_FIELDS},
            {k: v for k, v in data.items() if k in META_FIELDS})


def is_additive(key: str) -> bool:
    """True for payload keys that are sums over samples (pooling adds them)."""
    return key == "count" or key.endswith("_sum")


def save_batch_file(path: str | Path, payload: dict, meta: dict | None = None) -> None:
    """Write payload arrays and meta fields to one .npz, atomically.

    Args:
        path: output file.
        payload: arrays of an estimator (sums + `count`), or a loaded/pooled dict that carries meta.
        meta: from :func:`batch_meta`; None when `payload` already holds the meta fields.
    """
    payload, carried = split_meta(payload)
    meta = carried if meta is None else meta
    missing = [f for f in META_FIELDS if f not in meta]
    if missing:
        raise ValueError(f"{path}: meta fields {missing} are missing")
    if "count" not in payload:
        raise ValueError(f"{path}: the payload has no 'count'")
    arrays = {k: np.asarray(v) for k, v in payload.items()}
    arrays.update(
        format=np.int64(meta["format"]),
        estimator=np.str_(meta["estimator"]),
        layers=np.asarray([str(l) for l in meta["layers"]], dtype=np.str_),
        options=np.asarray(meta["options"], dtype=np.int64).reshape(-1, 2),
        quant=np.str_(meta["quant"]),
        checkpoint_sha256=np.str_(meta["checkpoint_sha256"]),
        settings=np.str_(meta["settings"]),
    )
    save_npz(path, **arrays)


def load_batch_file(path: str | Path) -> dict:
    """A per-batch or pooled file as a dict: payload arrays plus meta (layers as a list of str)."""
    data = load_npz(path)
    missing = [f for f in META_FIELDS + ("count",) if f not in data]
    if missing:
        raise ValueError(f"{path}: not a sensitivity file (missing {missing})")
    data["layers"] = [str(l) for l in np.atleast_1d(data["layers"])]
    data["format"] = int(data["format"])
    data["options"] = np.asarray(data["options"], dtype=np.int64).reshape(-1, 2)
    return data


def _meta_differs(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape != b.shape or not np.array_equal(a, b)
    return a != b


def _describe(field: str, a, b) -> str:
    if field in ("quant", "settings"):
        da, db = json.loads(a), json.loads(b)
        keys = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
        return ", ".join(f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in keys)
    if field == "layers":
        return f"{len(a)} layers {list(a)[:4]}... vs {len(b)} layers {list(b)[:4]}..."
    if field == "options":
        return f"{np.asarray(a).tolist()} vs {np.asarray(b).tolist()}"
    return f"{a!r} vs {b!r}"


def pool_batch_files(paths: Sequence[str | Path]) -> dict:
    """Pool per-batch (or already pooled) files: sums added, counts added, constants checked equal.

    Raises ValueError naming both files and the field when meta fields or payload keys differ.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("pool_batch_files needs at least one file")
    first = load_batch_file(paths[0])
    pooled, meta = split_meta(first)
    pooled = {k: (np.asarray(v, dtype=np.float64) if is_additive(k) and k != "count" else np.asarray(v))
              for k, v in pooled.items()}
    for p in paths[1:]:
        payload, m = split_meta(load_batch_file(p))
        for f in META_FIELDS:
            if _meta_differs(meta[f], m[f]):
                raise ValueError(f"cannot pool {paths[0]} with {p}: field {f!r} differs "
                                 f"({_describe(f, meta[f], m[f])})")
        if set(payload) != set(pooled):
            raise ValueError(f"cannot pool {paths[0]} with {p}: field 'payload keys' differs "
                             f"({sorted(pooled)} vs {sorted(payload)})")
        for k, v in payload.items():
            if is_additive(k):
                pooled[k] = pooled[k] + v
            elif np.shape(v) != np.shape(pooled[k]) or not np.allclose(v, pooled[k], rtol=_CONST_RTOL, atol=0):
                raise ValueError(f"cannot pool {paths[0]} with {p}: per-file constant {k!r} differs")
    return {**pooled, **meta}


def means(pooled: dict) -> dict:
    """Every `<name>_sum` divided by `count`, as `<name>` (float64)."""
    c = float(pooled["count"])
    if c <= 0:
        raise ValueError(f"count must be positive, got {c}")
    return {k[: -len("_sum")]: np.asarray(v, dtype=np.float64) / c for k, v in pooled.items() if k.endswith("_sum")}


def make_context(net, calib_x, w_bits=(2, 4, 8), a_bits=(8,), *, quant: dict | None = None,
                 candidates: Sequence[str] | None = None, fix_first_last: bool = True, device=None):
    """A calibrated pipeline.Context for an in-memory model (tests, benchmarks; no files involved).

    Args:
        net: the model (put in eval mode, moved to `device`).
        calib_x: calibration inputs (B, ...) (also the example that orders the layers).
        w_bits, a_bits: the option table is w_bits x a_bits.
        quant: overrides of the config's quant section (weight/activation schemes ...).
        candidates: keep only these candidate layers searched (others stay FP); default all.
        fix_first_last: first and last layer fixed at 8 bits.
        device: default the device of net's parameters.
    """
    import dataclasses

    from ..pipeline import Context, _quantizer, layer_table

    device = torch_device(net) if device is None else device
    net = net.to(device).eval()
    calib_x = calib_x.to(device)
    q = {
        "weight": {"granularity": "per_channel"},
        "activation": {"observer": "ema_minmax", "symmetric": False},
        "w_bits": list(w_bits),
        "a_bits": list(a_bits),
        "fixed_bits": 8,
        "fix_first_last": fix_first_last,
        "calibration_samples": int(calib_x.shape[0]),
        "calibration_batch_size": int(calib_x.shape[0]),
        **(quant or {}),
    }
    cfg = {"quant": q, "seed": 0}
    table = layer_table(cfg, net, calib_x)
    if candidates is not None:
        keep = set(candidates)
        table = dataclasses.replace(table, candidates=tuple(c for c in table.candidates if c in keep))
    quantizer = _quantizer(cfg, net, table)
    quantizer.calibrate([calib_x])
    return Context(cfg, "in_memory", net, quantizer, table, "in-memory", device)


def torch_device(net):
    """The device of a model's first parameter (cpu when it has none)."""
    import torch

    p = next(net.parameters(), None)
    return torch.device("cpu") if p is None else p.device
