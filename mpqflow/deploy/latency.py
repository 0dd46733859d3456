"""Per-layer latency tables: the input of the latency budgets (HAWQ-V3's constraint).

Usage:
    lat = read_latency_table("my_t4.csv")     # the file alone: columns, options, times, duplicates
    check_against_layers(lat, layer_table)     # every candidate at every option, no unknown layer
    costs = latency_costs(lat, layer_table)    # per option ms, the fixed layers' ms, the all-W8A8 ms
    lat.total_ms(assignment, layer_table)      # the table's sum for a full assignment (evaluations)

The format (CSV, one header line, one row per (layer, option)):
    layer    a Conv2d/Linear layer name as the layer table names it (layers.json)
    option   wWaA as :mod:`mpqflow.names` names options, e.g. w4a8
    ms       the layer's latency at that option in milliseconds: finite, > 0
    spread   how much it varied (e.g. the IQR of repeated runs) in ms: finite, >= 0, or empty if unknown
Further columns (runtime, device, batch, ...) are provenance: kept in the file, ignored here.

Every candidate layer needs a row at every option of the layer table; rows at other options are
ignored (a table measured over a wider option set serves a narrower search), except w8a8, which
is the reference of ``latency_rel``. The fixed first/last layers either all have a row at their
fixed option, and then add that constant to every total (as they do to size and BitOPs), or none
does, and then they add 0 ms and every latency total and cap is over the candidate layers only
(what a table of candidate layers can say). A table naming some fixed layers but not all is refused:
it is most likely missing a row.

Torch- and numpy-free: the config checks read the file while Snakemake builds the DAG.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from ..names import option_name, parse_option

__all__ = [
    "LATENCY_COLUMNS",
    "REFERENCE_OPTION",
    "LatencyTable",
    "LatencyTableError",
    "LatencyCosts",
    "read_latency_table",
    "check_against_layers",
    "latency_costs",
]

LATENCY_COLUMNS = ("layer", "option", "ms", "spread")
REFERENCE_OPTION = (8, 8)  # latency_rel-F is a fraction of the all-W8A8 model's latency


class LatencyTableError(ValueError):
    """A latency table that cannot be used; the message names the file, the line or layer and option,
    and what was expected."""


@dataclass(frozen=True)
class LatencyTable:
    """A read latency table: {(layer, (w_bits, a_bits)): ms} and the spread (None: not given) of each row.

    Args:
        path: the file it was read from (named in every error).
        ms: latency in milliseconds per (layer, option).
        spread: spread in milliseconds per (layer, option), None where the file leaves it empty.
    """

    path: str
    ms: dict
    spread: dict

    @property
    def layers(self) -> list[str]:
        """The layers the table has rows for, in file order."""
        return list(dict.fromkeys(l for l, _ in self.ms))

    def total_ms(self, assignment: dict, layers) -> float:
        """The table's sum over a full assignment {layer: (w_bits, a_bits)} of the layer table `layers`
        (candidates and fixed layers), fixed layers counting as :func:`latency_costs` counts them."""
        fixed_ms = latency_costs(self, layers).fixed_ms
        return fixed_ms + sum(self.ms[(l, tuple(assignment[l]))] for l in layers.candidates)


def _number(text: str, where: str, column: str, positive: bool) -> float:
    """The cell as a float: finite and > 0 (positive) or >= 0; LatencyTableError naming it otherwise."""
    expected = "a finite number of milliseconds " + ("> 0" if positive else ">= 0")
    try:
        value = float(text)
    except ValueError:
        raise LatencyTableError(f"{where}: {column} {text!r} is not a number; expected {expected}") from None
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise LatencyTableError(f"{where}: {column} {text!r}; expected {expected}")
    return value


def read_latency_table(path) -> LatencyTable:
    """The table in `path`, checked on its own: the file exists and is CSV with the columns layer,
    option, ms and spread; every option is wWaA, every ms finite and > 0, every spread finite and
    >= 0 or empty; no (layer, option) twice. Raises LatencyTableError naming the file and line."""
    path = str(path)
    if not Path(path).is_file():
        raise LatencyTableError(f"latency table {path!r} is not an existing file")
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise LatencyTableError(f"latency table {path!r} cannot be read as CSV: {err}") from None
    if not rows:
        raise LatencyTableError(f"latency table {path!r} is empty; expected a header {','.join(LATENCY_COLUMNS)}")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in LATENCY_COLUMNS if c not in header]
    if missing:
        raise LatencyTableError(
            f"latency table {path!r} line 1: column(s) {missing} missing from the header {header}; expected "
            f"{', '.join(LATENCY_COLUMNS)} (further columns are kept as provenance)"
        )
    col = {c: header.index(c) for c in LATENCY_COLUMNS}
    ms: dict = {}
    spread: dict = {}
    first_line: dict = {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line (a trailing newline an editor left)
        where = f"latency table {path!r} line {number}"
        if len(row) < len(header):
            raise LatencyTableError(f"{where}: {len(row)} cells for the {len(header)} columns of the header")
        layer, option_text = row[col["layer"]].strip(), row[col["option"]].strip()
        if not layer:
            raise LatencyTableError(f"{where}: the layer is empty; expected a layer name of the layer table")
        try:
            option = parse_option(option_text)
        except ValueError as err:
            raise LatencyTableError(f"{where}: {err}") from None
        key = (layer, option)
        if key in ms:
            raise LatencyTableError(
                f"{where}: layer {layer!r} option {option_name(option)} is listed twice (first on line "
                f"{first_line[key]}); expected one row per (layer, option)"
            )
        ms[key] = _number(row[col["ms"]].strip(), where, "ms", positive=True)
        cell = row[col["spread"]].strip()
        spread[key] = None if cell == "" else _number(cell, where, "spread", positive=False)
        first_line[key] = number
    if not ms:
        raise LatencyTableError(f"latency table {path!r} has a header but no rows")
    return LatencyTable(path=path, ms=ms, spread=spread)


def check_against_layers(table: LatencyTable, layers) -> None:
    """LatencyTableError unless `table` fits the layer table `layers` (:class:`mpqflow.layers.LayerTable`):
    no layer the layer table does not quantize, every candidate at every option, and the fixed
    layers all at their fixed option or none of them (see the module's docstring)."""
    known = set(layers.candidates) | set(layers.fixed)
    unknown = [l for l in table.layers if l not in known]
    if unknown:
        raise LatencyTableError(
            f"latency table {table.path!r}: layer {unknown[0]!r} is not a quantized layer of the layer table "
            f"(expected one of {list(layers.candidates) + list(layers.fixed)})"
        )
    for l in layers.candidates:
        for o in layers.options:
            if (l, tuple(o)) not in table.ms:
                raise LatencyTableError(
                    f"latency table {table.path!r}: no row for layer {l!r} option {option_name(o)}; expected "
                    "a row for every candidate layer at every option of the layer table "
                    f"({', '.join(option_name(p) for p in layers.options)})"
                )
    with_row = [l for l, o in layers.fixed.items() if (l, tuple(o)) in table.ms]
    if with_row and len(with_row) < len(layers.fixed):
        lacking = [l for l in layers.fixed if l not in with_row]
        raise LatencyTableError(
            f"latency table {table.path!r}: fixed layer(s) {with_row} have a row at their fixed option but "
            f"{lacking} do not ({', '.join(f'{l} {option_name(layers.fixed[l])}' for l in lacking)}); expected "
            "rows for every fixed layer (their latency counts in every total) or for none (totals over the "
            "candidate layers only)"
        )


@dataclass(frozen=True)
class LatencyCosts:
    """A latency table laid over a layer table's options.

    Args:
        per_option: ms of every (candidate, option) in the layer table's order (candidate-major, as
            :func:`mpqflow.optimize.build_problem` lays out options).
        fixed_ms: the fixed layers at their fixed options (0 where the table has none of them).
        reference_ms: the all-W8A8 model's latency (candidates at w8a8, fixed layers as fixed);
            None where some candidate has no w8a8 row (latency_rel is then refused).
        fixed_counted: whether the table has the fixed layers' rows (then fixed_ms is their sum).
    """

    per_option: list
    fixed_ms: float
    reference_ms: float | None
    fixed_counted: bool


def latency_costs(table: LatencyTable, layers) -> LatencyCosts:
    """The table's costs over the layer table `layers`, after :func:`check_against_layers`."""
    check_against_layers(table, layers)
    per_option = [table.ms[(l, tuple(o))] for l in layers.candidates for o in layers.options]
    fixed = [table.ms[(l, tuple(o))] for l, o in layers.fixed.items() if (l, tuple(o)) in table.ms]
    fixed_ms = float(sum(fixed))
    at_reference = [table.ms.get((l, REFERENCE_OPTION)) for l in layers.candidates]
    reference = None if None in at_reference else fixed_ms + float(sum(at_reference))
    return LatencyCosts(per_option, fixed_ms, reference, bool(fixed))
