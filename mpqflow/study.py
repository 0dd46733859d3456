"""Tables that join evaluation artifacts: the uniform table, the study CSV, Pareto curves and their AUC.

Usage:
    uniform_table(uniform_jsons, "results/m/eval/uniform.csv")
    df = study_table(uniform_jsons, decision_eval_jsons, "results/m/study.csv")
    auc = pareto_auc(df)      # one row per (method, set_size, set_id)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .io import load_json, save_csv

__all__ = ["uniform_table", "study_table", "STUDY_COLUMNS", "running_best", "pareto_auc", "ptq_table"]

UNIFORM_COLUMNS = ["option", "top1", "top5", "loss", "fp_top1", "size_mb", "avg_bits", "gbitops"]
STUDY_COLUMNS = [
    "method",
    "set_size",
    "set_id",
    "budget",
    "option",
    "top1",
    "top5",
    "loss",
    "fp_top1",
    "size_mb",
    "avg_bits",
    "gbitops",
    "estimated_loss_increase",
    "measured_loss_increase",
    "solver_status",
    "solver_gap",
    "solver_seconds",
    "choice",
]


def uniform_table(paths: list[str], out_csv: str) -> pd.DataFrame:
    """One row per uniform option, largest first; written atomically as CSV."""
    rows = [{k: load_json(p)[k] for k in UNIFORM_COLUMNS} for p in paths]
    df = pd.DataFrame(rows, columns=UNIFORM_COLUMNS).sort_values(["size_mb", "top1"], ascending=False)
    save_csv(out_csv, df)
    return df


def study_table(uniform_paths: list[str], eval_paths: list[str], out_csv: str) -> pd.DataFrame:
    """Every uniform and searched decision's evaluation in one table (deterministic row order)."""
    rows = [{**load_json(p), "method": "uniform"} for p in uniform_paths]
    rows += [load_json(p) for p in eval_paths]
    df = pd.DataFrame([{k: r.get(k) for k in STUDY_COLUMNS} for r in rows], columns=STUDY_COLUMNS)
    df = df.sort_values(["method", "set_size", "set_id", "budget", "option"], na_position="first")
    save_csv(out_csv, df.reset_index(drop=True))
    return df


def running_best(size: np.ndarray, acc: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Best accuracy reachable at or below each size in `grid` (NaN below the smallest point)."""
    order = np.argsort(size)
    best = np.maximum.accumulate(np.asarray(acc, float)[order])
    pos = np.searchsorted(np.asarray(size, float)[order], grid, side="right") - 1
    return np.where(pos >= 0, best[np.clip(pos, 0, None)], np.nan)


def pareto_auc(df: pd.DataFrame, points: int = 200) -> pd.DataFrame:
    """Area under each (method, set)'s running-best curve over the common size range, normalised to [0, 1].

    The range runs from the smallest size any searched decision reached to the largest; below a
    curve's first point it scores 0 accuracy (it has no decision there).
    """
    searched = df[df.method != "uniform"]
    if searched.empty:
        return pd.DataFrame(columns=["method", "set_size", "set_id", "auc"])
    grid = np.linspace(searched.size_mb.min(), searched.size_mb.max(), points)
    rows = []
    for (method, n, s), g in searched.groupby(["method", "set_size", "set_id"]):
        curve = np.nan_to_num(running_best(g.size_mb.to_numpy(), g.top1.to_numpy(), grid), nan=0.0)
        auc = float(np.trapezoid(curve, grid) / (grid[-1] - grid[0])) if grid[-1] > grid[0] else float(curve[-1])
        rows.append({"method": method, "set_size": int(n), "set_id": int(s), "auc": auc})
    return pd.DataFrame(rows)


def ptq_table(results: list) -> pd.DataFrame:
    """One row per (variant, option) of the PTQ study from :func:`mpqflow.stages.ptq.ptq_variant`
    results (dicts or JSON paths)."""
    rows = []
    for r in results:
        rows.extend((r if isinstance(r, dict) else load_json(r))["rows"])
    return pd.DataFrame(rows)
