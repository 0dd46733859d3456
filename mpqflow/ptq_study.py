"""The PTQ study's table and figure, from the variants' results (:func:`mpqflow.stages.ptq.ptq_variant`).

Usage (what :mod:`mpqflow.stages.ptq_report` does):
    df = ptq_table(["results/m/ptq/naive.json", ...])   # one row per (variant, option)
    ptq_plot(df, "results/m/plots/ptq.png", dpi=150, width=6.0)
"""

from __future__ import annotations

import pandas as pd

from .io import load_record
from .plotting import Figure
from .top1_bars import grouped_top1_bars

__all__ = ["ptq_table", "ptq_plot"]


def ptq_table(results: list) -> pd.DataFrame:
    """One row per (variant, option) of the PTQ study from :func:`mpqflow.stages.ptq.ptq_variant`
    results (dicts or JSON paths)."""
    rows = []
    for r in results:
        rows.extend((r if isinstance(r, dict) else load_record(r, "PTQ variant result", ["rows"]))["rows"])
    return pd.DataFrame(rows)


def ptq_plot(df: pd.DataFrame, png: str, dpi: int, width: float = 6.0) -> Figure:
    """The PTQ study: x = uniform option, one bar per variant, y = top-1 (%); saved and returned."""
    options = list(dict.fromkeys(df["option"]))
    variants = list(dict.fromkeys(df["variant"]))
    acc = df.pivot(index="option", columns="variant", values="top1").loc[options, variants] * 100
    acc.index = [o.upper() for o in options]
    labels = {"xlabel": "uniform option (weight bits, activation bits)", "legend": "variant",
              "title": "Post-training quantization: naive min/max vs ACIQ schemes"}  # fmt: skip
    return grouped_top1_bars(acc, 100 * float(df["fp_top1"].iloc[0]), png, labels, dpi, width)
