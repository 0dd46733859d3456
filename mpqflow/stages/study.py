"""Stage `study`: the variance study's tables and plots from the evaluations.

Usage (what workflow_scripts/study_table.py and study_plots.py call):
    study_table(uniform_jsons, decision_eval_jsons, "results/m/study.csv", finetuned_jsons,
                sanity_paths=sanity_jsons, sanity_csv="results/m/sanity.csv")
    study_plots("results/m/study.csv", "results/m/sensitivity/clado/set_4x0.npz", "results/m/layers.json",
                {"accuracy": "...png", ...}, plots_cfg)
    sanity_table(sanity_jsons)   # one row per (method, set): the no-budget solves

No torch: the layer table comes from layers.json.
"""

from __future__ import annotations

import numpy as np

from ..artifacts import load_batch_file, load_layer_table
from ..config import PlotsConfig
from ..io import load_csv, save_csv
from ..methods import clado_matrix
from ..study import STUDY_COLUMNS, calibration_table, estimate_standard_errors, sanity_table, study_table
from ..study_plots import (
    first_set_choices,
    plot_accuracy_vs_size,
    plot_estimated_vs_measured,
    plot_interaction_heatmap,
    plot_layer_bits,
    plot_pareto,
)

__all__ = ["study_table", "study_plots", "sanity_table"]


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
    df = load_csv(table_csv, "study table", STUDY_COLUMNS)
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
