"""Stage `gradquant_report`: the gradient-quantization study's tables, plots and report from its runs
(stage `gradquant`).

Usage (what workflow_scripts/gradquant_study.py calls):
    write_gradquant_study(["results/m/gradquant/none.json", ...], outputs, plots_cfg)

No torch: it reads the runs' JSON records.
"""

from __future__ import annotations

from ..config import PlotsConfig
from ..gradquant_study import RUN_FIELDS, gradquant_report, gradquant_tables, plot_gradquant
from ..io import atomic_path, load_record, save_csv

__all__ = ["write_gradquant_study"]


def write_gradquant_study(run_paths: list[str], outputs: dict, plots: PlotsConfig) -> None:
    """The gradient-quantization study's table (`outputs["table"]`), variance curves (`variance`), plots
    (`variance_plot`, `accuracy_plot`) and markdown report (`report`) from its runs' JSON files."""
    table, curves = gradquant_tables(
        [load_record(p, "gradient-quantization run record", RUN_FIELDS) for p in run_paths]
    )
    save_csv(outputs["table"], table, float_format=None)
    save_csv(outputs["variance"], curves, float_format=None)
    plot_gradquant(table, curves, outputs["variance_plot"], outputs["accuracy_plot"], plots.dpi, plots.panel_width)
    with atomic_path(outputs["report"]) as tmp:
        tmp.write_text(gradquant_report(table))
