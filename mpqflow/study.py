"""The variance study's tables from the evaluations: the study CSV, the sanity table, Pareto curves and their
AUC, the estimates' standard errors and their calibration against the measurements.

Usage:
    df = study_table(uniform_jsons, decision_eval_jsons, "results/m/study.csv", finetuned_eval_jsons,
                     sanity_paths=sanity_jsons, sanity_csv="results/m/sanity.csv")
    sanity = sanity_table(sanity_jsons)   # one row per (method, set): the no-budget solve
    auc = pareto_auc(df)      # one row per (method, set_size, set_id), over auc_range(df)
    calibration_table(df)     # per method and set size: how well the estimates track the measurements
(:mod:`mpqflow.study_plots` draws the figures; the PTQ, fine-tuning and gradient-quantization studies
have their own modules.)
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .artifacts import decision_target, load_batch_file, load_evaluation, load_layer_table
from .io import damaged, load_json, save_csv
from .names import parse_option

log = logging.getLogger("mpqflow")

__all__ = [
    "study_table", "sanity_table", "STUDY_COLUMNS", "SANITY_COLUMNS", "running_best", "auc_range",
    "calibration_table", "choice_vector", "estimate_standard_errors", "pareto_auc",
]  # fmt: skip

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
    "top1_qat",
    "loss_qat",
    "sanity_pass",
]
SANITY_COLUMNS = [
    "method", "set_size", "set_id", "passes", "layers_at_highest", "layers", "highest", "estimated_loss_increase",
    "estimated_at_highest", "solver_status", "choice",
]  # fmt: skip


def sanity_table(paths: list[str]) -> pd.DataFrame:
    """One row per (method, set) from the no-budget solves (stages.solve.sanity_check: a result or a
    list of them per file), sorted."""
    rows = []
    for p in paths:
        got = load_json(p)
        for r in got if isinstance(got, list) else [got]:
            fields = ("method", "set_size", "set_id", "solver", "choice")
            missing = [f for f in fields if f not in r] if isinstance(r, dict) else list(fields)
            if missing or not isinstance(r["solver"], dict) or "status" not in r["solver"]:
                raise damaged(p, f"not a whole sanity-check record (fields {missing or ['solver.status']} missing)")
            rows.append({**r, "solver_status": r["solver"]["status"], "choice": " ".join(r["choice"])})
    df = pd.DataFrame([{k: r.get(k) for k in SANITY_COLUMNS} for r in rows], columns=SANITY_COLUMNS)
    return df.sort_values(["method", "set_size", "set_id"]).reset_index(drop=True)


def study_table(
    uniform_paths: list[str],
    eval_paths: list[str],
    out_csv: str,
    finetuned_paths=(),
    *,
    sanity_paths=(),
    sanity_csv: str | None = None,
    budgets_path: str | None = None,
    latency_path: str | None = None,
    layers_path: str | None = None,
) -> pd.DataFrame:
    """Every uniform and searched decision's evaluation in one table (deterministic row order), with
    top1_qat / loss_qat of the decisions that were fine-tuned and sanity_pass (whether the decision's
    method and set pick the highest precision everywhere with no budget; empty where not checked).
    `sanity_csv`: also write the sanity table there. `budgets_path`: the budgets' caps (budgets.json of
    check_budgets); when some budgets share a cap on this model, a last column `same_cap_as` names, on
    each row of such a budget, the others (space-separated; their rows repeat the same decisions), and
    a warning is logged. Without shared caps the table has no such column. `latency_path` (latency.table,
    with `layers_path`, the layer table it fits): a column `latency_ms` after gbitops, each row's
    latency by the table's sum over its assignment (:meth:`mpqflow.deploy.latency.LatencyTable.total_ms`);
    without a table the table has no such column."""
    rows = [{**load_evaluation(p, "uniform evaluation"), "method": "uniform"} for p in uniform_paths]
    rows += [load_evaluation(p, "decision evaluation") for p in eval_paths]
    qat = {
        (r["method"], decision_target(r)): r
        for r in (load_evaluation(p, "fine-tuned evaluation", ("method", "top1", "loss")) for p in finetuned_paths)
    }
    sanity = sanity_table(list(sanity_paths))
    passes = {(r.method, r.set_size, r.set_id): bool(r.passes) for r in sanity.itertuples()}
    for r in rows:
        q = qat.get((r["method"], decision_target(r)), {})
        r.update(top1_qat=q.get("top1"), loss_qat=q.get("loss"))
        r["sanity_pass"] = passes.get((r["method"], r.get("set_size"), r.get("set_id")))
    if sanity_csv is not None:
        save_csv(sanity_csv, sanity)
    columns = STUDY_COLUMNS
    if latency_path is not None:
        columns = _with_latency(rows, eval_paths, uniform_paths, latency_path, layers_path)
    shared = _shared_caps(budgets_path) if budgets_path is not None else {}
    if shared:
        columns = [*columns, "same_cap_as"]
        for r in rows:
            r["same_cap_as"] = " ".join(shared.get(r.get("budget"), [])) or None
        log.warning(
            "budgets with the same cap (the same decisions, solved and evaluated once each): %s",
            "; ".join(f"{b} = {' = '.join(o)}" for b, o in shared.items() if all(b < x for x in o)),
        )
    df = pd.DataFrame([{k: r.get(k) for k in columns} for r in rows], columns=columns)
    df = df.sort_values(["method", "set_size", "set_id", "budget", "option"], na_position="first")
    save_csv(out_csv, df.reset_index(drop=True))
    return df


def _with_latency(rows: list, eval_paths, uniform_paths, latency_path: str, layers_path: str) -> list:
    """Each row's `latency_ms` by the latency table; the study columns with latency_ms after gbitops."""
    from .deploy.latency import check_against_layers, read_latency_table

    table, latency = load_layer_table(layers_path), read_latency_table(latency_path)
    check_against_layers(latency, table)
    for r, path in zip(rows, [*uniform_paths, *eval_paths]):
        if not isinstance(r.get("assignment"), dict):
            raise damaged(path, "no `assignment` (layer -> [w_bits, a_bits]) to sum the latency table over")
        r["latency_ms"] = latency.total_ms({l: tuple(o) for l, o in r["assignment"].items()}, table)
    at = STUDY_COLUMNS.index("gbitops") + 1
    return [*STUDY_COLUMNS[:at], "latency_ms", *STUDY_COLUMNS[at:]]


def _shared_caps(budgets_path: str) -> dict:
    """{budget: [budgets with the same cap]} of the budgets that share one, from budgets.json."""
    caps = load_json(budgets_path)
    if not isinstance(caps, dict) or any(not isinstance(c, dict) or "same_cap_as" not in c for c in caps.values()):
        raise damaged(budgets_path, "not a budgets record of check_budgets (each budget's `same_cap_as` expected)")
    return {b: list(c["same_cap_as"]) for b, c in caps.items() if c["same_cap_as"]}


def running_best(size: np.ndarray, acc: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Best accuracy reachable at or below each size in `grid` (NaN below the smallest point)."""
    order = np.argsort(size)
    best = np.maximum.accumulate(np.asarray(acc, float)[order])
    pos = np.searchsorted(np.asarray(size, float)[order], grid, side="right") - 1
    return np.where(pos >= 0, best[np.clip(pos, 0, None)], np.nan)


def _searched(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.method != "uniform"].dropna(subset=["size_mb", "top1"])


def auc_range(df: pd.DataFrame) -> tuple[float, float]:
    """The size range [lo, hi] on which every searched (method, set) running-best curve has a value.

    lo is the largest of the curves' smallest sizes (below its first decision a curve has no value,
    and scoring it 0 there would reward whichever method happened to pick the smallest decision);
    hi is the largest size any curve reached (past its largest decision a running-best curve keeps its
    best value: that decision is still at or below every larger size). (nan, nan) without decisions.
    """
    searched = _searched(df)
    if searched.empty:
        return float("nan"), float("nan")
    sizes = searched.groupby(["method", "set_size", "set_id"]).size_mb
    return float(sizes.min().max()), float(sizes.max().max())


def _mean_best(size: np.ndarray, acc: np.ndarray, lo: float, hi: float) -> float:
    """Exact mean of the running-best step curve over [lo, hi] (its value at lo when hi == lo)."""
    xs = np.unique(np.concatenate([[lo], size[(size > lo) & (size < hi)]]))  # the steps inside the range
    ys = running_best(size, acc, xs)
    if hi <= lo:
        return float(ys[0])
    return float(ys @ np.diff(np.append(xs, hi)) / (hi - lo))


def pareto_auc(df: pd.DataFrame) -> pd.DataFrame:
    """Normalised area under each (method, set)'s running-best curve over the range all curves share.

    AUC = (1 / (hi - lo)) * integral from lo to hi of best_top1(s) ds, with best_top1(s) the best top-1
    among the curve's decisions of size <= s and [lo, hi] from :func:`auc_range`, the same for every
    curve compared (every searched method and set in `df`). A method is thus never credited for sizes
    where another has no decision, and one lone small decision scores its own top-1 across the range.
    When the range is a single size, each curve's AUC is its running-best top-1 there (logged).
    """
    searched = _searched(df)
    if searched.empty:
        return pd.DataFrame(columns=["method", "set_size", "set_id", "auc"])
    lo, hi = auc_range(df)
    if hi <= lo:
        log.warning("Pareto AUC: every curve shares only the size %.6g MB; AUC is the best top-1 there", lo)
    rows = []
    for (method, n, s), g in searched.groupby(["method", "set_size", "set_id"]):
        auc = _mean_best(g.size_mb.to_numpy(float), g.top1.to_numpy(float), lo, hi)
        rows.append({"method": method, "set_size": int(n), "set_id": int(s), "auc": auc})
    return pd.DataFrame(rows, columns=["method", "set_size", "set_id", "auc"])


def choice_vector(choice: str, table) -> np.ndarray:
    """(n,) 0/1 decision of a study row's `choice` (one option name per candidate layer)."""
    names = choice.split()
    if len(names) != len(table.candidates):
        raise ValueError(f"choice {choice!r} names {len(names)} options for {len(table.candidates)} candidate layers")
    K, index = len(table.options), {tuple(o): k for k, o in enumerate(table.options)}
    x = np.zeros(len(table.candidates) * K)
    for l, name in enumerate(names):
        x[l * K + index[parse_option(name)]] = 1.0
    return x


def estimate_standard_errors(df: pd.DataFrame, batch_files: list[str], table, settings: dict) -> np.ndarray:
    """(len(df),) standard error of each decision's estimated loss increase: the spread of the
    estimate the method gives the same decision from each single pool batch, over √(set size)
    (batches are i.i.d. samples, so a set of N batches averages N such estimates).

    Exact for the methods linear in the batch means (mpqco, hawq, clado_raw, clado_naive, zeroq);
    for clado, clado_kl and clado_na (a projection and thresholds of the mean) the spread of their
    single-batch estimates, an approximation. NaN for uniform, limpq (no per-batch files) and
    estimators with fewer than 2 batch files.

    Args:
        df: study rows (method, set_size, choice).
        batch_files: per-batch sensitivity files (the pool batches of the sets; any estimators).
        table: layers.LayerTable.
        settings: each method's own settings as solved ({method: dict}, :func:`mpqflow.methods.method_settings`;
            a method without settings may be left out).
    """
    from .methods import estimated_loss_increase, method_estimator, method_objective

    files: dict[str, list[dict]] = {}
    for path in batch_files:
        data = load_batch_file(path)
        files.setdefault(str(data["estimator"]), []).append(data)
    objectives: dict[str, list] = {}
    out = np.full(len(df), np.nan)
    for i, row in enumerate(df.itertuples(index=False)):
        est = method_estimator(row.method)
        if est is None or len(files.get(est, [])) < 2 or not isinstance(row.choice, str):
            continue
        if row.method not in objectives:
            objectives[row.method] = [
                method_objective(row.method, f, table, settings.get(row.method, {})) for f in files[est]
            ]
        x = choice_vector(row.choice, table)
        per_batch = [estimated_loss_increase(row.method, obj, x) for obj in objectives[row.method]]
        out[i] = np.std(per_batch, ddof=1) / np.sqrt(int(row.set_size))
    return out


def calibration_table(df: pd.DataFrame) -> pd.DataFrame:
    """How well each method's estimate tracks the measured loss increase, by set size: over its
    decisions (all budgets and sets of that size), Spearman's rank correlation, the mean absolute
    error and the mean signed error (estimate − measured; nats, except LIMPQ's indicator units), and
    the mean standard error of the estimates (`estimate_se`, when df has it: the sampling noise part
    of the error). Which estimator to trust with how many batches."""
    from scipy.stats import spearmanr

    searched = df[df.method != "uniform"].dropna(subset=["estimated_loss_increase", "measured_loss_increase"])
    rows = []
    for (method, size), g in searched.groupby(["method", "set_size"], sort=True):
        est, meas = g.estimated_loss_increase.to_numpy(float), g.measured_loss_increase.to_numpy(float)
        constant = np.ptp(est) == 0 or np.ptp(meas) == 0  # a rank correlation is undefined
        rows.append({
            "method": method, "set_size": int(size), "decisions": len(g),
            "spearman": np.nan if constant or len(g) < 3 else float(spearmanr(est, meas).statistic),
            "mae": float(np.abs(est - meas).mean()), "bias": float((est - meas).mean()),
            "se_mean": float(g.estimate_se.mean()) if "estimate_se" in g and g.estimate_se.notna().any() else np.nan,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["method", "set_size", "decisions", "spearman", "mae", "bias", "se_mean"])
