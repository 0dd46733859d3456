"""Stage `finetune_report`: PTQ vs fine-tuned top-1 of the fine-tuned decisions, a table and a plot.

Usage (what workflow_scripts/finetune_table.py and finetune_plot.py call):
    finetune_table(finetuned_jsons, ptq_jsons, "results/m/finetune.csv")
    plot_finetune_table("results/m/finetune.csv", "results/m/plots/finetune.png", plots_cfg)

No torch: it reads the evaluations' JSON files (stage evaluate), not the fine-tuned models.
"""

from __future__ import annotations

from ..config import PlotsConfig
from ..finetune_study import FINETUNE_COLUMNS, finetune_plot, finetune_table
from ..io import load_csv

__all__ = ["finetune_table", "plot_finetune_table"]


def plot_finetune_table(csv: str, png: str, plots: PlotsConfig) -> None:
    """PTQ vs fine-tuned top-1 of a table written by :func:`mpqflow.finetune_study.finetune_table`."""
    finetune_plot(
        load_csv(csv, "fine-tuning table", FINETUNE_COLUMNS), png, dpi=plots.dpi, width=1.2 * plots.panel_width
    )
