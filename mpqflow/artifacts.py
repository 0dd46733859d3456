"""One owner per artifact: how each file under results/ is written, read and checked.

Usage:
    save_checkpoint(path, net.state_dict(), "resnet20", fp_metrics)   # results/{model}/model.pt
    fp_metrics(path)                                                  # its held-out FP metrics
    save_calibration(path, quantizer.state_dict(), table, sha, quant)  # results/{model}/calibration.pt
    state, table = load_calibration(path, checkpoint_sha256=sha, quant=quant.to_dict())
    save_layer_table(path, table, sha); load_layer_table(path)        # results/{model}/layers.json
    check_set_matches_table(pooled, pooled_path, table, layers_path)  # a set made with this table?
    save_batch_file(path, payload, meta); pool_batch_files(paths)     # sensitivity/{est}/*.npz
    save_decision(path, decision); load_decision(path, table)         # decisions/.../{budget}.json
    decision_assignment(decision, table)                              # its choices + the fixed layers
    set_identity(load_batch_file(path), path)                         # (n, s) a set file records
    decision_target(eval_record)                                      # "set_4x0/avg_bits-2.5" or "w2a8"

Every write is atomic (:mod:`mpqflow.io`); every read checks what the file claims to be made from
and names the file when it refuses. Torch is imported only to read or write the .pt files, so the
torch-free stages (solve and the reports) can use the rest. Sensitivity files:
    `count` (samples) and every key ending in `_sum` are sums over samples: pooling adds them.
    Any other payload key (e.g. hawq's `weight_err`) is a per-file constant that does not depend on
    the samples: pooling checks that all files agree and keeps it.
Meta fields (checked equal before pooling): estimator, layers, options, quant, checkpoint_sha256,
settings (the estimator settings that change numbers), format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .checkpoints import torch_load
from .io import damaged, load_json, load_npz, load_record, regenerate_remedy, save_json, save_npz, save_torch
from .layers import LayerTable, table_fault
from .names import parse_option
from .paths import set_dir

__all__ = [
    "FORMAT_VERSION",
    "META_FIELDS",
    "save_checkpoint",
    "load_checkpoint",
    "fp_metrics",
    "save_calibration",
    "load_calibration",
    "save_layer_table",
    "load_layer_table",
    "layer_table_digest",
    "check_set_matches_table",
    "split_meta",
    "is_additive",
    "save_batch_file",
    "nonfinite_layers",
    "refuse_nonfinite",
    "load_batch_file",
    "pool_batch_files",
    "means",
    "save_decision",
    "load_decision",
    "decision_assignment",
    "SET_FIELDS",
    "set_identity",
    "decision_target",
    "load_evaluation",
]

FORMAT_VERSION = 3  # 2: every estimator also stores second moments (standard errors); 3: CLADO's paired differences
META_FIELDS = ("format", "estimator", "layers", "options", "quant", "checkpoint_sha256", "settings")
SET_FIELDS = ("set_size", "set_id")  # a set file's identity (set NxS); per-batch files have none
_CONST_RTOL = 1e-6  # per-file constants (e.g. weight errors) may differ by float noise across devices


def split_meta(data: dict) -> tuple[dict, dict]:
    """(payload, meta) of a loaded or pooled dict."""
    return (
        {k: v for k, v in data.items() if k not in META_FIELDS + SET_FIELDS},
        {k: v for k, v in data.items() if k in META_FIELDS + SET_FIELDS},
    )


def is_additive(key: str) -> bool:
    """True for payload keys that are sums over samples (pooling adds them)."""
    return key == "count" or key.endswith("_sum")


def save_batch_file(path: str | Path, payload: dict, meta: dict | None = None) -> None:
    """Write payload arrays and meta fields to one .npz, atomically.

    Args:
        path: output file.
        payload: arrays of an estimator (sums + `count`), or a loaded/pooled dict that carries meta.
        meta: from :func:`batch_meta`; None when `payload` already holds the meta fields. A set file
            also records its identity (SET_FIELDS: set_size, set_id), in payload or meta.
    """
    payload, carried = split_meta(payload)
    meta = {**carried, **(meta or {})}  # an explicit meta wins over what the payload carries
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
    arrays.update({f: np.int64(meta[f]) for f in SET_FIELDS if f in meta})
    save_npz(path, **arrays)


def load_batch_file(path: str | Path) -> dict:
    """A per-batch or pooled file as a dict: payload arrays plus meta (layers as a list of str)."""
    data = load_npz(path)
    missing = [f for f in META_FIELDS + ("count",) if f not in data]
    if missing:
        raise damaged(path, f"not a sensitivity file (fields {missing} missing)")
    data["layers"] = [str(l) for l in np.atleast_1d(data["layers"])]
    data["format"] = int(data["format"])
    if data["format"] != FORMAT_VERSION:
        raise damaged(
            path,
            f"sensitivity file format {data['format']}, this mpqflow reads format {FORMAT_VERSION} "
            "(format 1 had no second moments, so no standard errors; format 2 no paired differences of "
            "CLADO's effects)",
            "recompute it (the workflow reruns its job; delete a file made outside it)",
        )
    data["options"] = np.asarray(data["options"], dtype=np.int64).reshape(-1, 2)
    for f in SET_FIELDS:
        if f in data:
            data[f] = int(data[f])
    return data


def set_identity(data: dict, path) -> tuple[int, int]:
    """(set_size, set_id) that a set file records (rule pool_set or limpq_indicators wrote it); a
    ValueError naming the file for a per-batch file or one written before sets recorded their identity."""
    if any(f not in data for f in SET_FIELDS):
        raise damaged(
            path,
            "not a sensitivity set file (no set_size / set_id recorded): a per-batch file, or a set "
            "file written before sets recorded their identity",
            "recompute it (the workflow reruns its job)",
        )
    return int(data["set_size"]), int(data["set_id"])


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
    pooled = {
        k: (np.asarray(v, dtype=np.float64) if is_additive(k) and k != "count" else np.asarray(v))
        for k, v in pooled.items()
    }
    for p in paths[1:]:
        payload, m = split_meta(load_batch_file(p))
        for f in META_FIELDS:
            if _meta_differs(meta[f], m[f]):
                raise ValueError(
                    f"cannot pool {paths[0]} with {p}: field {f!r} differs ({_describe(f, meta[f], m[f])})"
                )
        if set(payload) != set(pooled):
            raise ValueError(
                f"cannot pool {paths[0]} with {p}: field 'payload keys' differs ({sorted(pooled)} vs {sorted(payload)})"
            )
        for k, v in payload.items():
            if is_additive(k):
                pooled[k] = pooled[k] + v
            elif np.shape(v) != np.shape(pooled[k]) or not np.allclose(v, pooled[k], rtol=_CONST_RTOL, atol=0):
                raise ValueError(f"cannot pool {paths[0]} with {p}: per-file constant {k!r} differs")
    return {**pooled, **{k: v for k, v in meta.items() if k not in SET_FIELDS}}  # a pool of batches is no set yet


def means(pooled: dict) -> dict:
    """Every `<name>_sum` divided by `count`, as `<name>` (float64)."""
    c = float(pooled["count"])
    if c <= 0:
        raise ValueError(f"count must be positive, got {c}")
    return {k[: -len("_sum")]: np.asarray(v, dtype=np.float64) / c for k, v in pooled.items() if k.endswith("_sum")}


# ---------------------------------------------------------------- model checkpoint and calibration


def save_checkpoint(path, state_dict: dict, arch: str, metrics: dict) -> None:
    """The FP model: its state_dict (CPU tensors), architecture and held-out metrics."""
    save_torch(path, {"state_dict": state_dict, "arch": arch, "fp_metrics": metrics})


def load_checkpoint(path) -> dict:
    """{state_dict, arch, fp_metrics} of a checkpoint written by :func:`save_checkpoint`."""
    ckpt = torch_load(
        path, "model checkpoint", f"expected results/<model>/model.pt written by train_model; {regenerate_remedy(path)}"
    )
    if not isinstance(ckpt, dict) or not {"state_dict", "arch", "fp_metrics"} <= set(ckpt):
        raise damaged(path, "not a model checkpoint written by mpqflow (expected state_dict, arch, fp_metrics)")
    return ckpt


def fp_metrics(path) -> dict:
    """The held-out metrics of the FP model stored in its checkpoint."""
    return load_checkpoint(path)["fp_metrics"]


_CALIBRATION_KEYS = ("quantizer", "table", "checkpoint_sha256", "quant_config")


def save_calibration(path, quantizer_state: dict, table: LayerTable, checkpoint_sha256: str, quant: dict) -> None:
    """Calibrated quantizer parameters, with the layer table, checkpoint hash and quant section they belong to."""
    save_torch(
        path,
        {
            "quantizer": quantizer_state,
            "table": table.to_dict(),
            "checkpoint_sha256": checkpoint_sha256,
            "quant_config": quant,
        },
    )


def load_calibration(path, checkpoint_sha256: str, quant: dict) -> tuple[dict, LayerTable]:
    """(quantizer state, layer table); refuses a calibration of another checkpoint or quant section."""
    calib = torch_load(
        path, "calibration", f"expected results/<model>/calibration.pt written by calibrate; {regenerate_remedy(path)}"
    )
    if not isinstance(calib, dict) or any(k not in calib for k in _CALIBRATION_KEYS):
        raise damaged(path, f"not a calibration written by mpqflow (expected {list(_CALIBRATION_KEYS)})")
    fault = table_fault(calib["table"])
    if fault:
        raise damaged(path, f"its layer table: {fault}")
    if calib["checkpoint_sha256"] != checkpoint_sha256:
        raise ValueError(
            f"{path} was calibrated for another checkpoint (sha256 {calib['checkpoint_sha256'][:12]}..., "
            f"expected {checkpoint_sha256[:12]}...)"
        )
    if calib["quant_config"] != quant:
        keys = sorted(
            k for k in set(quant) | set(calib["quant_config"]) if quant.get(k) != calib["quant_config"].get(k)
        )
        made = calib["quant_config"]
        values = "; ".join(
            f"quant.{k}: {made.get(k, '(absent)')!r} there, {quant.get(k, '(absent)')!r} in the config" for k in keys
        )
        raise ValueError(
            f"{path} was made with other quant settings than the config's 'quant' section (differing keys: "
            f"{keys}; {values}); rerun calibrate with this config"
        )
    return calib["quantizer"], LayerTable.from_dict(calib["table"])


def layer_table_digest(content: dict) -> str:
    """SHA-256 of a layer table's content (its fields and checkpoint_sha256) as canonical JSON: what
    layers.json records in its `sha256` field."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_layer_table(path, table: LayerTable, checkpoint_sha256: str) -> None:
    """The layer table as JSON, what the torch-free stages need of the model: its fields, the hash of
    the checkpoint it was calibrated from and `sha256`, the digest of both (:func:`layer_table_digest`),
    so that every reader can refuse a table edited or damaged after calibrate wrote it."""
    content = {**table.to_dict(), "checkpoint_sha256": str(checkpoint_sha256)}
    save_json(path, {**content, "sha256": layer_table_digest(content)})


def load_layer_table(path, checkpoint_sha256: str | None = None, against: str | None = None) -> LayerTable:
    """Inverse of :func:`save_layer_table`, the one reader of layers.json. Refuses, naming the file
    and the remedy (rerun calibrate), a table that is not whole (a field, or a layer's entry in one,
    missing: named), one whose content does not match the digest calibrate recorded in it (edited or
    damaged since), and, given `checkpoint_sha256`, one calibrated from another checkpoint than
    `against` (the file that records that hash, for the message) was made from."""
    data = load_json(path)
    fault = table_fault(data)
    if fault:
        raise damaged(path, f"not a whole layer table: {fault}")
    recorded = data.get("sha256")
    content = {k: v for k, v in data.items() if k != "sha256"}
    if not isinstance(recorded, str) or "checkpoint_sha256" not in data:
        raise damaged(
            path,
            "records no content hash (sha256) or checkpoint (checkpoint_sha256): not written by this "
            "mpqflow's calibrate (tables record both since issue 24)",
        )
    actual = layer_table_digest(content)
    if actual != recorded:
        raise damaged(
            path,
            f"was edited or damaged since calibrate wrote it (its content hashes to {actual[:12]}..., "
            f"calibrate recorded sha256 {recorded[:12]}... in it)",
        )
    if checkpoint_sha256 is not None and data["checkpoint_sha256"] != str(checkpoint_sha256):
        raise damaged(
            path,
            f"calibrated from another checkpoint (sha256 {data['checkpoint_sha256'][:12]}...) than "
            f"{against or 'expected'} (sha256 {str(checkpoint_sha256)[:12]}...)",
            f"{regenerate_remedy(path)}, and {against} the same way" if against else None,
        )
    return LayerTable.from_dict(data)


def check_set_matches_table(pooled: dict, pooled_path, table: LayerTable, layers_path) -> None:
    """Refuse a sensitivity set (loaded from `pooled_path`) that was not made with the layer table of
    `layers_path`: its layers must be the table's candidates and its options the table's, naming both files."""
    layers = list(pooled["layers"])
    if layers != list(table.candidates):
        only_set = [l for l in layers if l not in table.candidates]
        only_table = [l for l in table.candidates if l not in layers]
        raise damaged(
            pooled_path,
            f"its layers differ from the candidates of the layer table {layers_path} (only in the set: "
            f"{only_set}, only in the table: {only_table}, or another order)",
            f"{regenerate_remedy(pooled_path)}; if {layers_path} is the one out of date, rerun calibrate: "
            f"{regenerate_remedy(layers_path)}",
        )
    options = [tuple(int(b) for b in o) for o in np.asarray(pooled["options"]).reshape(-1, 2)]
    if options != [tuple(o) for o in table.options]:
        raise damaged(
            pooled_path,
            f"its options {options} differ from the option table {list(map(tuple, table.options))} of {layers_path}",
        )


# ---------------------------------------------------------------- decisions


def decision_target(record: dict) -> str:
    """How tables name an evaluated (or fine-tuned) decision: 'set_4x0/avg_bits-2.5' (its set and
    budget), or its option ('w2a8') for a uniform one."""
    if record.get("method") == "uniform":
        return record["option"]
    return f"{set_dir(record['set_size'], record['set_id'])}/{record['budget']}"


def load_evaluation(path, what: str = "evaluation", fields=("top1", "loss")) -> dict:
    """An evaluation record (eval/ or finetuned/ JSON) with `fields` and the fields that name its
    decision (:func:`decision_target`: `option` of a uniform one, else method, budget, set_size,
    set_id); a DamagedArtifact naming the file and the missing fields otherwise."""
    record = load_record(path, what, fields)
    uniform = record.get("method", "uniform") == "uniform"
    naming = ("option",) if uniform else ("method", "budget", "set_size", "set_id")
    missing = [f for f in naming if f not in record]
    if missing:
        raise damaged(path, f"not a complete {what}: field(s) {missing} missing (they name its decision)")
    return record


def save_decision(path, decision: dict) -> None:
    """A solved decision: method, budget, set, candidates, choice (option names), estimate, solver record."""
    save_json(path, decision)


DECISION_FIELDS = ("method", "budget", "set_size", "set_id", "candidates", "choice")


def load_decision(path, table: LayerTable | None = None) -> dict:
    """A decision; with `table`, refuse one whose candidate layers or options are not the table's."""
    decision = load_record(path, "decision", DECISION_FIELDS)
    if table is not None:
        if decision["candidates"] != list(table.candidates):
            raise damaged(path, "its candidate layers differ from the calibration's layer table")
        unknown = sorted({o for o in decision["choice"] if parse_option(o) not in table.options})
        if unknown:
            raise damaged(path, f"options {unknown} are not in the option table {list(table.options)}")
    return decision


def decision_assignment(decision: dict, table: LayerTable) -> dict:
    """The full assignment of a decision loaded against `table`: its choices plus the fixed layers."""
    return table.full_assignment(
        {l: parse_option(o) for l, o in zip(table.candidates, decision["choice"], strict=True)}
    )


def nonfinite_layers(payload: dict, layers: Sequence[str], options: int) -> dict[str, list[str]]:
    """{payload key: candidate layers with a NaN or infinite entry} (keys with none left out).

    An array's axes index options (length n = L*K, option i = l*K + k) or layers (length L); an entry
    names the layers of every axis it sits on, so a pairwise (n, n) entry names both layers.
    """
    L, n = len(layers), len(layers) * options
    found: dict[str, list[str]] = {}
    for key, value in payload.items():
        a = np.asarray(value)
        if a.dtype.kind not in "fc" or np.isfinite(a).all():
            continue
        bad: set[int] = set()
        nonfinite = ~np.isfinite(a)
        for axis, size in enumerate(a.shape):
            per = options if size == n else 1 if size == L else None
            if per is not None:
                rows = nonfinite.any(axis=tuple(ax for ax in range(a.ndim) if ax != axis))  # (size,)
                bad |= {int(r) // per for r in np.flatnonzero(rows)}
        found[key] = [layers[l] for l in sorted(bad)] if bad else ["(not per layer)"]
    return found


def refuse_nonfinite(payload: dict, layers: Sequence[str], options: int, what: str) -> None:
    """ValueError naming `what` (the estimator and batch) and the layers, if any entry is NaN or infinite.

    Where it arises, not in the solve: a non-finite sensitivity makes every objective meaningless.
    """
    found = nonfinite_layers(payload, layers, options)
    if found:
        listed = "; ".join(f"{key} at {', '.join(names[:6])}" + (" …" if len(names) > 6 else "")
                           for key, names in found.items())  # fmt: skip
        raise ValueError(
            f"{what}: non-finite sensitivities (NaN or inf): {listed}. The model's losses or gradients overflow "
            "(e.g. saturated or constant logits, or a diverged checkpoint); check the model's "
            "accuracy and losses in eval/uniform/ or the training log"
        )
