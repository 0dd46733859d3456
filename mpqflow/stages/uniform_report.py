"""Stage `uniform_report`: the table of the uniform options' evaluations.

Usage (what workflow_scripts/uniform_table.py calls):
    uniform_table(["results/m/eval/uniform/w8a8.json", ...], "results/m/eval/uniform.csv")

No torch.
"""

from __future__ import annotations

import pandas as pd

from ..io import load_record, save_csv

__all__ = ["UNIFORM_COLUMNS", "uniform_table"]

UNIFORM_COLUMNS = ["option", "top1", "top5", "loss", "fp_top1", "size_mb", "avg_bits", "gbitops"]


def uniform_table(paths: list[str], out_csv: str) -> pd.DataFrame:
    """One row per uniform option, largest first; written atomically as CSV."""
    rows = [{k: load_record(p, "uniform evaluation", UNIFORM_COLUMNS)[k] for k in UNIFORM_COLUMNS} for p in paths]
    df = pd.DataFrame(rows, columns=UNIFORM_COLUMNS).sort_values(["size_mb", "top1"], ascending=False)
    save_csv(out_csv, df)
    return df
