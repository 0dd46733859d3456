"""The grouped top-1 bar chart that the PTQ study and the fine-tuning study draw their figure with.

Usage:
    acc = pd.DataFrame({"naive": [70.1, 88.0], "all": [81.2, 90.3]}, index=["W4A4", "W8A4"])  # top-1 (%)
    grouped_top1_bars(acc, 91.5, "ptq.png", {"xlabel": "...", "title": "...", "legend": "variant"}, 150, 6.0)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .plotting import Figure, plt, save_png

__all__ = ["grouped_top1_bars"]


def grouped_top1_bars(acc: pd.DataFrame, fp: float, png: str, labels: dict, dpi: int, width: float) -> Figure:
    """Grouped bar chart of top-1 (%): x = acc's index, one bar per column; FP top-1 as a dashed line;
    saved to `png` and returned.

    The y axis starts just below the worst bar (not at 0), so every bar carries its value.
    labels: xlabel, title, legend (title of the legend)."""
    series = list(acc.columns)
    x, w = np.arange(len(acc.index)), 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(1.3 * width, 0.5 * len(acc.index) * len(series)), 0.6 * width))
    shifts = [(i - (len(series) - 1) / 2) * w for i in range(len(series))]
    for shift, v in zip(shifts, series):
        ax.bar(x + shift, acc[v].to_numpy(), w, label=v)
    ax.axhline(fp, color="k", ls="--", lw=1, label="FP")
    values = acc.to_numpy(dtype=float)
    lo = float(np.nanmin(values))  # zoom on the differences: the axis starts near the worst bar
    ax.set_ylim(
        max(0.0, np.floor(lo - 2 - 0.1 * (fp - lo))), min(103.0, max(fp, float(np.nanmax(values))) + 3)
    )  # room for the labels
    for shift, v in zip(shifts, series):  # the value on every bar: the axis does not start at 0
        for xi, val in zip(x + shift, acc[v].to_numpy()):
            ax.annotate(
                f"{val:.1f}", (xi, val), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                fontsize=6, rotation=90, bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
            )  # fmt: skip
    ax.set_xticks(
        x, list(acc.index), rotation=30 if len(acc.index) > 4 else 0, ha="right" if len(acc.index) > 4 else "center"
    )
    ax.set_xlabel(labels["xlabel"])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(labels["title"])
    ax.legend(title=labels.get("legend"), fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_png(fig, png, dpi)
