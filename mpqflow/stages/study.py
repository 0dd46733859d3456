"""Stage `study`: the variance study's tables and plots from the evaluations.

Usage (what workflow_scripts/uniform_table.py, study_table.py and study_plots.py call):
    uniform_table(uniform_jsons, "results/m/eval/uniform.csv")
    study_table(uniform_jsons, decision_eval_jsons, "results/m/study.csv")
    study_plots("results/m/study.csv", "results/m/sensitivity/clado/set_4x0.npz", "results/m/layers.json",
                {"accuracy": "...png", ...}, plots_cfg)
    write_ptq_table(["results/m/ptq/naive.json", ...], "results/m/ptq.csv")   # the PTQ study's table
    plot_ptq_table("results/m/ptq.csv", "results/m/plots/ptq.png", plots_cfg)  # and its plot
    finetune_table(finetuned_jsons, ptq_jsons, "results/m/finetune.csv")   # PTQ vs fine-tuned
    plot_finetune_table("results/m/finetune.csv", "results/m/plots/finetune.png", plots_cfg)
    write_gradquant_study(["results/m/gradquant/none.json", ...], outputs, plots_cfg)  # gradient quantization

No torch: the layer table comes from layers.json.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..artifacts import load_batch_file, load_layer_table
from ..config import PlotsConfig
from ..gradquant_study import gradquant_report, gradquant_tables, plot_gradquant
from ..io import atomic_path, load_json, save_csv
from ..methods import clado_matrix
from ..plots import (
    finetune_plot,
    first_set_choices,
    plot_accuracy_vs_size,
    plot_estimated_vs_measured,
    plot_interaction_heatmap,
    plot_layer_bits,
    plot_pareto,
    ptq_plot,
)
from ..study import (
    calibration_table,
    estimate_standard_errors,
    finetune_table,
    ptq_table,
    sanity_table,
    study_table,
    uniform_table,
)

__all__ = [
    "uniform_table", "study_table", "study_plots", "write_ptq_table", "plot_ptq_table", "finetune_table",
    "plot_finetune_table", "write_gradquant_study", "sanity_table",
]  # fmt: skip


def study_plots(
    table_csv: str,
    clado_set: str | None,
    layers_path: str,
    out: dict,
    plots: PlotsConfig,
    batch_files: list[str] | None = None,
    settings: dict | None = None,
) -> None:
    """Draw every study figure from the study table (and the CLADO matrix for the heat map).

    Args:
        out: paths by figure: accuracy, pareto, auc (the Pareto AUC table, CSV), sanity, heatmap, bits,
            and optionally calibration (the estimate-vs-measurement table, CSV).
        batch_files: per-batch sensitivity files (any estimators): the estimates' standard errors
            (:func:`mpqflow.study.estimate_standard_errors`) for the error bars and the calibration table.
        settings: each searched method's own settings as solved ({method: dict}; needed with batch_files
            for the methods that have settings, clado_na and limpq).
    """
    dpi, width = plots.dpi, plots.panel_width
    df = pd.read_csv(table_csv)
    table = load_layer_table(layers_path)
    if batch_files:
        df["estimate_se"] = estimate_standard_errors(df, batch_files, table, settings or {})
    plot_accuracy_vs_size(df, out["accuracy"], dpi, width)
    plot_pareto(df, out["pareto"], out["auc"], dpi, width)
    plot_estimated_vs_measured(df, out["sanity"], dpi, width)
    if "calibration" in out:
        save_csv(out["calibration"], calibration_table(df))
    layers, options = list(table.candidates), [list(o) for o in table.options]
    if clado_set:
        G = clado_matrix(load_batch_file(clado_set), "ce")
    else:
        G = np.zeros((len(layers) * len(options),) * 2)
    plot_interaction_heatmap(G, layers, options, out["heatmap"], dpi)
    plot_layer_bits(first_set_choices(df), layers, out["bits"], dpi)


def write_ptq_table(results: list, csv: str) -> pd.DataFrame:
    """The PTQ study's table of the variants' JSON paths (or dicts), written atomically to `csv`."""
    df = ptq_table(results)
    save_csv(csv, df, float_format=None)  # full precision: the table feeds the plot
    return df


def plot_ptq_table(csv: str, png: str, plots: PlotsConfig) -> None:
    """The PTQ study's bar chart of a table written by :func:`write_ptq_table`."""
    ptq_plot(pd.read_csv(csv), png, dpi=plots.dpi, width=1.2 * plots.panel_width)


def plot_finetune_table(csv: str, png: str, plots: PlotsConfig) -> None:
    """PTQ vs fine-tuned top-1 of a table written by :func:`mpqflow.study.finetune_table`."""
    finetune_plot(pd.read_csv(csv), png, dpi=plots.dpi, width=1.2 * plots.panel_width)


def write_gradquant_study(run_paths: list[str], outputs: dict, plots: PlotsConfig) -> None:
    """The gradient-quantization study's table (`outputs["table"]`), variance curves (`variance`), plots
    (`variance_plot`, `accuracy_plot`) and markdown report (`report`) from its runs' JSON files."""
    table, curves = gradquant_tables([load_json(p) for p in run_paths])
    save_csv(outputs["table"], table, float_format=None)
    save_csv(outputs["variance"], curves, float_format=None)
    plot_gradquant(table, curves, outputs["variance_plot"], outputs["accuracy_plot"], plots.dpi, plots.panel_width)
    with atomic_path(outputs["report"]) as tmp:
        tmp.write_text(gradquant_report(table))
