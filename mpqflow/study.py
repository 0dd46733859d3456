"""Tables that join evaluation artifacts.

Usage:
    uniform_table(["results/m/eval/uniform/w8a8.json", ...], "results/m/eval/uniform.csv")
"""

from __future__ import annotations

import pandas as pd

from .io import atomic_path, load_json

__all__ = ["uniform_table"]

UNIFORM_COLUMNS = ["option", "top1", "top5", "loss", "fp_top1", "size_mb", "avg_bits", "gbitops"]


def uniform_table(paths: list[str], out_csv: str) -> pd.DataFrame:
    """One row per uniform option, sorted by size then accuracy; written atomically as CSV."""
    rows = [{k: load_json(p)[k] for k in UNIFORM_COLUMNS} for p in paths]
    df = pd.DataFrame(rows, columns=UNIFORM_COLUMNS).sort_values(["size_mb", "top1"], ascending=False)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return df
