"""Stage `ptq_report`: the PTQ study's table and plot from its variants' results (stage `ptq`).

Usage (what workflow_scripts/ptq_table.py and ptq_plot.py call):
    write_ptq_table(["results/m/ptq/naive.json", ...], "results/m/ptq.csv")
    plot_ptq_table("results/m/ptq.csv", "results/m/plots/ptq.png", plots_cfg)

No torch.
"""

from __future__ import annotations

import pandas as pd

from ..config import PlotsConfig
from ..io import load_csv, save_csv
from ..ptq_study import ptq_plot, ptq_table

__all__ = ["write_ptq_table", "plot_ptq_table"]


def write_ptq_table(results: list, csv: str) -> pd.DataFrame:
    """The PTQ study's table of the variants' JSON paths (or dicts), written atomically to `csv`."""
    df = ptq_table(results)
    save_csv(csv, df, float_format=None)  # full precision: the table feeds the plot
    return df


def plot_ptq_table(csv: str, png: str, plots: PlotsConfig) -> None:
    """The PTQ study's bar chart of a table written by :func:`write_ptq_table`."""
    ptq_plot(
        load_csv(csv, "PTQ table", ("option", "variant", "top1", "fp_top1")),
        png,
        dpi=plots.dpi,
        width=1.2 * plots.panel_width,
    )
