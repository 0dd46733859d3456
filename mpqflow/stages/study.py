"""Stage `study`: the variance study's tables and plots from the evaluations.

Usage (what workflow_scripts/study_table.py and study_plots.py call):
    study_table(uniform_jsons, decision_eval_jsons, "results/m/study.csv", finetuned_jsons,
                sanity_paths=sanity_jsons, sanity_csv="results/m/sanity.csv")
    study_plots("results/m/study.csv", "results/m/layers.json", {"accuracy": "...png", ...}, plots_cfg)
    interaction_heatmap("results/m/sensitivity/clado/set_4x0.npz", "results/m/layers.json", "...png", plots_cfg)
    sanity_table(sanity_jsons)   # one row per (method, set): the no-budget solves

No torch: the layer table comes from layers.json.
"""

from __future__ import annotations

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

__all__ = ["study_table", "study_plots", "interaction_heatmap", "sanity_table"]


def study_plots(
    table_csv: str,
    layers_path: str,
    out: dict,
    plots: PlotsConfig,
    batch_files: list[str] | None = None,
    settings: dict | None = None,
) -> None:
    """Draw every study figure that the study table feeds (the heat map is :func:`interaction_heatmap`).

    Args:
        out: paths by figure: accuracy, pareto, auc (the Pareto AUC table, CSV), sanity, bits,
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
    plot_layer_bits(first_set_choices(df), list(table.candidates), out["bits"], dpi)


def interaction_heatmap(pairwise_set: str, layers_path: str, out_png: str, plots: PlotsConfig) -> None:
    """The pairwise estimator's (CLADO's) cross-layer interaction matrix of one sensitivity set, drawn.

    Only a config with a pairwise method has the rule: without one there is no matrix to draw.
    """
    table = load_layer_table(layers_path)
    G = clado_matrix(load_batch_file(pairwise_set), "ce")
    plot_interaction_heatmap(G, list(table.candidates), [list(o) for o in table.options], out_png, plots.dpi)
