"""LIMPQ's importance indicators as a project artifact: import of LIMPQ's released pickles, the
outlier rule, and the search objective. Torch-free (the solve stage reads it).

Usage:
    payload = read_limpq_pickle("importance_indicators_resnet50.pkl", table)   # by layer name
    save_batch_file("results/m/sensitivity/limpq/set_4x0.npz", payload, meta)
    write_limpq_pickle("out.pkl", payload)             # LIMPQ's own format, e.g. for its search script
    allowed = limpq_allowed(payload, table)            # (n,) False where the outlier rule forbids
    linear = limpq_linear(payload, table, alpha=2.0)   # (n,) twice Σ Δs_a + α·Δs_w per option

An indicator is the learned LSQ step size of a layer's weights (or input activation) at one
bit-width. LIMPQ's payload: `w_indicator` (L, Kw) and `a_indicator` (L, Ka), columns in the order of
`w_bits` / `a_bits` (descending, as LIMPQ lists its candidates), rows in the candidates' order;
`count`: samples the indicators were trained on (0 when imported).

Outlier rule (LIMPQ's search script sets such entries to 1e8; here they are forbidden options, listed
in the decision): with a layer's bit-widths in descending order, a bit-width whose indicator is
below the next higher bit-width's (a lower precision that "looks less important", which joint
training produces now and then) is forbidden. The highest bit-width is never forbidden, so every
layer keeps at least its (w_max, a_max) option. Comparisons use the indicators as trained, not ones
already marked.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from .artifacts import load_batch_file
from .io import atomic_path

__all__ = [
    "read_limpq_pickle",
    "read_limpq_structure",
    "write_limpq_pickle",
    "limpq_forbidden_bits",
    "limpq_allowed",
    "limpq_linear",
]
__all__ += ["bit_lists", "MASK_PREFIX", "prune_masks", "read_prune_masks"]

MASK_PREFIX = "prune_mask."  # payload keys of LIMPQP's pruning masks: prune_mask.<layer> (bool, weight shape)


def bit_lists(table) -> tuple[list[int], list[int]]:
    """(weight bit-widths, activation bit-widths) of the option table, each descending."""
    return (
        sorted({int(w) for w, _ in table.options}, reverse=True),
        sorted({int(a) for _, a in table.options}, reverse=True),
    )


class _DataOnly(pickle.Unpickler):
    """A pickle of plain dicts, lists, strings and numbers only: no class is ever imported (a pickle
    can run code through any global it names)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; a LIMPQ indicator file holds plain data only")


def _strip(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


# at most this many file layers may have other bit-widths than the config's before the layer table is
# known: the first and last layers, which quant.fix_first_last keeps out of the search (and the file)
_FIXED_LAYERS = 2

_EXPECTED = "expected LIMPQ's format {'weight': {layer: {'bits': step}}, 'act': {...}, 'layer_name': [...]}"


def _load(path: Path) -> dict:
    """The pickle's dict, unpickled as plain data only, with its 'weight' / 'act' parts checked to map
    layer names (without a DataParallel 'module.' prefix) to {bit-width (int): indicator (float)}."""
    try:
        data = _DataOnly(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as err:
        cause = str(err) if isinstance(err, pickle.UnpicklingError) else f"{type(err).__name__}: {err}"
        raise ValueError(f"{path}: not a LIMPQ indicator pickle ({cause}); {_EXPECTED}") from None
    if not isinstance(data, dict) or not {"weight", "act"} <= set(data):
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a dict with keys 'weight', 'act' (and 'layer_name'), got {keys}")
    parts = {}
    for part in ("weight", "act"):
        per_layer = data[part]
        if not isinstance(per_layer, dict) or not per_layer:
            what = "an empty dict" if isinstance(per_layer, dict) else type(per_layer).__name__
            raise ValueError(f"{path}: '{part}' must map layer names to {{bit-width: indicator}}, got {what}")
        parts[part] = {_strip(str(layer)): _entry(path, part, layer, e) for layer, e in per_layer.items()}
    return {**parts, "layer_name": [_strip(str(k)) for k in data.get("layer_name", [])]}


def _entry(path, part: str, layer, entry) -> dict[int, float]:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: '{part}'[{_strip(str(layer))!r}] must map bit-widths to indicators")
    have = {}
    for k, v in entry.items():
        try:
            have[int(k)] = float(v)
        except (TypeError, ValueError):
            raise ValueError(
                f"{path}: '{part}'[{_strip(str(layer))!r}] has entry {k!r}: {v!r}, expected 'bits': number"
            ) from None
    return have


def _bits_fault(path, part: str, layer: str, have: dict, bits: list[int]) -> str | None:
    """Why a layer's entry does not cover exactly `bits` with usable step sizes; None if it does."""
    missing, extra = sorted(set(bits) - set(have)), sorted(set(have) - set(bits))
    if missing or extra:
        return (
            f"{path}: '{part}'[{layer!r}] has bit-widths {sorted(have)}, quant.w_bits / a_bits give {sorted(bits)}"
            + (f" (missing {missing})" if missing else "")
            + (f" ({extra} are not in the option table: set quant.w_bits / a_bits to match)" if extra else "")
        )
    row = [have[b] for b in bits]
    if not all(np.isfinite(row)) or min(row) <= 0:
        return f"{path}: '{part}'[{layer!r}] has indicators {row}; step sizes must be finite and > 0"
    return None


def _indicator_rows(path, part: str, data: dict, layers: list[str], bits: list[int]) -> np.ndarray:
    """(L, K) indicators of `part` ('weight' / 'act') for `layers` at `bits`, refusing any mismatch."""
    rows = []
    for layer in layers:
        if layer not in data[part]:
            raise ValueError(f"{path}: '{part}' has no indicators of layer {layer!r}")
        fault = _bits_fault(path, part, layer, data[part][layer], bits)
        if fault:
            raise ValueError(fault)
        rows.append([data[part][layer][b] for b in bits])
    return np.asarray(rows, dtype=np.float64)


def read_limpq_structure(path: str | Path, w_bits, a_bits) -> None:
    """Check what a LIMPQ pickle must hold before the layer table is known: LIMPQ's format, plain data,
    and the config's bit-widths (`w_bits`, `a_bits`) at every layer but the (fixed) first and last.

    For a check before any job where the layer table cannot be traced; :func:`read_limpq_pickle`
    checks everything against the table. ValueError naming the file, the part and the layer.
    """
    path = Path(path)
    data = _load(path)
    for part, bits in (("weight", sorted(set(w_bits), reverse=True)), ("act", sorted(set(a_bits), reverse=True))):
        faults = [f for layer, have in data[part].items() if (f := _bits_fault(path, part, layer, have, bits))]
        if len(faults) > _FIXED_LAYERS or len(faults) == len(data[part]):
            raise ValueError(faults[0] + (f" (and {len(faults) - 1} more layers)" if len(faults) > 1 else ""))


def read_limpq_pickle(path: str | Path, table) -> dict:
    """The indicator payload of a LIMPQ-format pickle, mapped onto `table`'s candidates by name.

    The file: {'weight': {layer: {'6': s, ...}}, 'act': {...}, 'layer_name': [...]}, layer names of
    the model as LIMPQ saved them (a DataParallel 'module.' prefix is dropped). Layers the table fixes
    (first/last) may be present and are ignored; a candidate missing from the file, a file layer the
    model does not have, or a bit-width set different from the option table's is an error naming it.
    """
    path = Path(path)
    data = _load(path)
    named = set(data["weight"]) | set(data["act"]) | set(data["layer_name"])
    unknown = sorted(named - set(table.layers))
    if unknown:
        raise ValueError(
            f"{path}: layers {unknown[:5]} are not Conv2d/Linear layers of the model (first of {len(unknown)}); "
            f"the model's are e.g. {list(table.layers)[:5]}"
        )
    w_bits, a_bits = bit_lists(table)
    layers = list(table.candidates)
    return {
        "w_indicator": _indicator_rows(path, "weight", data, layers, w_bits),
        "a_indicator": _indicator_rows(path, "act", data, layers, a_bits),
        "w_bits": np.asarray(w_bits, dtype=np.int64),
        "a_bits": np.asarray(a_bits, dtype=np.int64),
        "count": np.int64(0),
    }


def write_limpq_pickle(path: str | Path, payload: dict, layers) -> None:
    """The payload in LIMPQ's released format (atomically), e.g. to run LIMPQ's own search on it."""

    def part(key, bits):
        return {l: {str(int(b)): float(v) for b, v in zip(bits, row)} for l, row in zip(layers, payload[key])}

    data = {
        "weight": part("w_indicator", payload["w_bits"]),
        "act": part("a_indicator", payload["a_bits"]),
        "layer_name": list(layers),
    }
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(pickle.dumps(data, protocol=4))


def prune_masks(payload: dict) -> dict[str, np.ndarray]:
    """{layer: bool mask, True = kept} of an indicator payload ({} when the run pruned nothing)."""
    return {k[len(MASK_PREFIX) :]: np.asarray(v, dtype=bool) for k, v in payload.items() if k.startswith(MASK_PREFIX)}


def read_prune_masks(path: str | Path) -> dict[str, np.ndarray]:
    """The pruning masks of a limpq set file (results/<model>/sensitivity/limpq/set_NxS.npz)."""
    data = load_batch_file(path)
    if data["estimator"] != "limpq":
        raise ValueError(f"{path}: expected a limpq indicator file, got estimator {data['estimator']!r}")
    return prune_masks(data)


def limpq_forbidden_bits(indicators) -> np.ndarray:
    """(L, K) bool: True where the outlier rule forbids a bit-width (columns in descending bits)."""
    s = np.asarray(indicators, dtype=np.float64)  # (L, K)
    forbidden = np.zeros(s.shape, dtype=bool)
    forbidden[:, 1:] = s[:, 1:] < s[:, :-1]  # a lower bit-width below the next higher one's
    return forbidden


def _columns(payload: dict, table) -> tuple[np.ndarray, np.ndarray]:
    """(n,) column of each option's weight bits in w_indicator, and of its activation bits in a_indicator."""
    w_bits, a_bits = [int(b) for b in payload["w_bits"]], [int(b) for b in payload["a_bits"]]
    try:
        w_col = [w_bits.index(int(w)) for w, _ in table.options]
        a_col = [a_bits.index(int(a)) for _, a in table.options]
    except ValueError:
        raise ValueError(
            f"the indicators cover weight bits {w_bits} and activation bits {a_bits}, "
            f"not every option of {list(table.options)}"
        ) from None
    L = len(table.candidates)
    return np.tile(w_col, L), np.tile(a_col, L)


def limpq_allowed(payload: dict, table) -> np.ndarray:
    """(n,) bool, option i = l*K + k: False where the weight or activation bit-width is forbidden.

    Raises ValueError naming a layer left with no option (possible only for an option table without
    the (highest w, highest a) pair)."""
    w_col, a_col = _columns(payload, table)
    layer = np.repeat(np.arange(len(table.candidates)), len(table.options))
    allowed = ~(
        limpq_forbidden_bits(payload["w_indicator"])[layer, w_col]
        | limpq_forbidden_bits(payload["a_indicator"])[layer, a_col]
    )
    empty = [table.candidates[l] for l in range(len(table.candidates)) if not allowed[layer == l].any()]
    if empty:
        raise ValueError(f"LIMPQ's outlier rule forbids every option of layers {empty}")
    return allowed


def limpq_linear(payload: dict, table, alpha: float) -> np.ndarray:
    """(n,) LIMPQ's objective per option, twice Σ (s_a[l, a] − s_a[l, a_max]) + α (s_w[l, w] − s_w[l, w_max]).

    LIMPQ minimises Σ s_a + α·s_w; subtracting each layer's highest-precision value changes no decision
    (one option per layer) and makes the estimate 0 at full precision, as the other methods' are."""
    w_col, a_col = _columns(payload, table)
    layer = np.repeat(np.arange(len(table.candidates)), len(table.options))
    s_w, s_a = np.asarray(payload["w_indicator"], float), np.asarray(payload["a_indicator"], float)
    cost = s_a[layer, a_col] - s_a[layer, 0] + alpha * (s_w[layer, w_col] - s_w[layer, 0])
    return 2.0 * cost
