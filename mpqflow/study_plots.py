"""The variance study's figures: PNG files with titles, labelled axes, units and legends.

Usage:
    df = pd.read_csv("results/m/study.csv")
    plot_accuracy_vs_size(df, "accuracy_vs_size.png", dpi=150, width=5.0)
    plot_pareto(df, "pareto_auc.png", "pareto_auc.csv")      # also writes the AUC table
(:func:`mpqflow.stages.study.study_plots` draws them all from the study's files.) Each function saves its PNG
and returns the figure (:func:`mpqflow.plotting.save_png`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize, TwoSlopeNorm

from .io import save_csv
from .names import parse_option
from .plotting import Figure, plt, save_png
from .study import auc_range, pareto_auc, running_best

__all__ = [
    "plot_accuracy_vs_size",
    "plot_pareto",
    "plot_estimated_vs_measured",
    "plot_interaction_heatmap",
    "plot_layer_bits",
    "first_set_choices",
]


_MARKERS = "o^Dv<>PX*h"  # "s" is uniform's


def _colors(methods) -> dict:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(methods))}


def _markers(methods) -> dict:
    return {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(sorted(methods))}


def _offsets(methods, step: float) -> dict:
    """A fixed horizontal offset per method, centred on 0, so that coinciding points stay visible."""
    ms = sorted(methods)
    return {m: (i - (len(ms) - 1) / 2) * step for i, m in enumerate(ms)}


def _mean_std(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std over axis 0 ignoring NaN, without warnings: NaN where no curve has a
    value, std 0 where one has."""
    ok = np.isfinite(curves)
    n = ok.sum(0)
    vals = np.where(ok, curves, 0.0)
    mean = np.divide(vals.sum(0), n, out=np.full(n.shape, np.nan), where=n > 0)
    dev = np.where(ok, curves - mean, 0.0)
    std = np.sqrt(np.divide((dev**2).sum(0), n, out=np.full(n.shape, np.nan), where=n > 0))
    return mean, std


def _fp_line(ax, df: pd.DataFrame) -> None:
    fp = df.fp_top1.dropna()
    if len(fp):
        ax.axhline(100 * fp.iloc[0], color="grey", lw=1, ls=":", label="full precision")


def plot_accuracy_vs_size(df: pd.DataFrame, path: str, dpi: int, width: float = 5.0) -> Figure:
    """Top-1 vs size per method, mean ± std over set ids, one panel per set size; uniform as reference.

    Each method has its own marker and a small fixed horizontal offset (0.6 % of the size range per
    method), so that decisions of equal size and accuracy do not hide each other; one set: no error bar.
    """
    searched, uniform = df[df.method != "uniform"], df[df.method == "uniform"].sort_values("size_mb")
    sizes = sorted(searched.set_size.dropna().unique()) or [None]
    methods = searched.method.unique()
    colors, markers = _colors(methods), _markers(methods)
    span = float(np.ptp(df.size_mb.dropna())) if df.size_mb.notna().any() else 0.0
    step = 0.006 * span
    offsets = _offsets(methods, step)
    fig, axes = plt.subplots(1, len(sizes), figsize=(width * len(sizes), 4), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for method, g in searched[searched.set_size == n].groupby("method"):
            stats = (  # pandas' std of one set is NaN (no warning): no error bar
                g.groupby("budget")
                .agg(x=("size_mb", "mean"), x_std=("size_mb", "std"), y=("top1", "mean"), y_std=("top1", "std"))
                .sort_values("x")
            )
            ax.errorbar(
                stats.x + offsets[method],
                100 * stats.y,
                xerr=stats.x_std.fillna(0),
                yerr=100 * stats.y_std.fillna(0),
                marker=markers[method],
                ms=5,
                capsize=3,
                alpha=0.85,
                color=colors[method],
                label=method,
            )
        ax.plot(uniform.size_mb, 100 * uniform.top1, "k--s", ms=4, lw=1, label="uniform")
        _fp_line(ax, df)
        n_sets = searched[searched.set_size == n].set_id.nunique()
        ax.set_title(f"sensitivity sets of {int(n)} batch(es), n={n_sets} sets" if n is not None else "uniform")
        ax.set_xlabel(f"model size (MB of quantized weights)\nmethods offset by {step:.2g} MB steps to stay visible")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out top-1 accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle("Accuracy vs size per method (mean ± std over sensitivity sets)")
    return save_png(fig, path, dpi)


def plot_pareto(df: pd.DataFrame, path: str, auc_csv: str, dpi: int, width: float = 5.0) -> Figure:
    """Running-best Pareto curves (mean ± std over sets) and their AUC per method; writes the AUC table.

    The shaded band is the size range the AUC integrates over (:func:`mpqflow.study.auc_range`)."""
    auc = pareto_auc(df)
    save_csv(auc_csv, auc)
    searched = df[df.method != "uniform"].dropna(subset=["size_mb", "top1"])
    colors = _colors(searched.method.unique())
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(2 * width, 4))
    if not searched.empty:
        grid = np.linspace(searched.size_mb.min(), searched.size_mb.max(), 200)
        for method, g in searched.groupby("method"):
            sets = g.groupby(["set_size", "set_id"])
            curves = np.array([running_best(h.size_mb.to_numpy(), h.top1.to_numpy(), grid) for _, h in sets])
            mean, std = _mean_std(curves)  # (grid,)
            ax.plot(grid, 100 * mean, color=colors[method], label=method, drawstyle="steps-post")
            ax.fill_between(grid, 100 * (mean - std), 100 * (mean + std), color=colors[method], alpha=0.15, step="post")
        lo, hi = auc_range(df)
        ax.axvspan(lo, hi, color="grey", alpha=0.1, label="AUC range (all curves defined)")
        stats = auc.dropna(subset=["auc"]).groupby("method").auc.agg(["mean", "std"]).fillna(0).sort_values("mean")
        if not stats.empty:
            bx.barh(
                stats.index,
                100 * stats["mean"],
                xerr=100 * stats["std"],
                capsize=3,
                color=[colors[m] for m in stats.index],
            )
            lo_bar = 100 * (stats["mean"] - stats["std"]).min()
            bx.set_xlim(max(0.0, lo_bar - 2), 100 * (stats["mean"] + stats["std"]).max() + 1)
    _fp_line(ax, df)
    ax.set(
        xlabel="model size (MB of quantized weights)",
        ylabel="best top-1 at or below this size (%)",
        title="Running-best Pareto curves (mean ± std over sets)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    bx.set(
        xlabel="mean best top-1 over the shaded size range (%)",
        title="Pareto AUC per method (mean ± std over sets)",
    )
    bx.grid(alpha=0.3, axis="x")
    return save_png(fig, path, dpi)


INDICATOR_UNITS = ("limpq",)  # methods whose estimate is a score (learned step sizes), not a loss


def plot_estimated_vs_measured(df: pd.DataFrame, path: str, dpi: int, width: float = 5.0) -> Figure:
    """Each method's estimated loss increase for its decisions against the measured one, with ±1 SE
    error bars on the estimates where df has an `estimate_se` column."""
    searched = df[df.method != "uniform"].dropna(subset=["estimated_loss_increase", "measured_loss_increase"])
    colors = _colors(searched.method.unique())
    fig, ax = plt.subplots(figsize=(width * 1.3, width))
    has_se = "estimate_se" in searched and searched.estimate_se.notna().any()
    for method, g in searched.groupby("method"):
        label = f"{method} (indicator units, not nats)" if method in INDICATOR_UNITS else method
        ax.scatter(
            g.measured_loss_increase, g.estimated_loss_increase, s=18, alpha=0.8, color=colors[method], label=label
        )
        if has_se and g.estimate_se.notna().any():
            ax.errorbar(
                g.measured_loss_increase, g.estimated_loss_increase, yerr=g.estimate_se.fillna(0.0),
                fmt="none", ecolor=colors[method], elinewidth=0.8, alpha=0.6, capsize=2,
            )  # fmt: skip
    if not searched.empty:
        lo = min(searched.measured_loss_increase.min(), searched.estimated_loss_increase.min(), 0.0)
        hi = max(searched.measured_loss_increase.max(), searched.estimated_loss_increase.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="estimate = measurement")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set(
        xlabel="measured loss increase on the sensitivity set (nats, symlog)",
        ylabel="method's estimated loss increase (nats, symlog)",
        title="Estimated vs measured loss increase of chosen decisions"
        + ("\n(bars: ±1 standard error of the estimate, from its spread over single batches)" if has_se else ""),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path, dpi)


def plot_interaction_heatmap(G: np.ndarray, layers: list[str], options: list, path: str, dpi: int) -> Figure:
    """The cross-layer interaction matrix G (layers × options) with a diverging colour scale centred on 0."""
    n, k = G.shape[0], len(options)
    vmax = float(np.percentile(np.abs(G), 99)) or 1.0
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(G, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -vmax, vmax), interpolation="nearest")
    for b in range(k, n, k):
        ax.axhline(b - 0.5, color="k", lw=0.3)
        ax.axvline(b - 0.5, color="k", lw=0.3)
    centres = np.arange(len(layers)) * k + (k - 1) / 2
    ax.set_xticks(centres, layers, rotation=90, fontsize=6)
    ax.set_yticks(centres, layers, fontsize=6)
    opts = ", ".join(f"w{w}a{a}" for w, a in options)
    ax.set(
        xlabel=f"candidate layer (options within a block: {opts})",
        ylabel="candidate layer",
        title="CLADO interaction matrix G (cross-entropy; colour clipped at the 99th |G| percentile)",
    )
    fig.colorbar(im, ax=ax, shrink=0.8, label="G[i, j] (nats)")
    return save_png(fig, path, dpi)


def _layer_bits_panel(ax, decisions: dict, budgets: list, cols: range, norm, text: bool):
    w = np.array([[decisions[b][c][0] for c in cols] for b in budgets], float)  # (budgets, layers in row)
    im = ax.imshow(w, cmap="viridis", norm=norm, aspect="auto")
    if text:
        for (r, j), wb in np.ndenumerate(w):
            ab = decisions[budgets[r]][cols[j]][1]
            ax.text(j, r, f"{int(wb)}/{ab}", ha="center", va="center", fontsize=6, color="w" if norm(wb) < 0.6 else "k")
    ax.set_yticks(range(len(budgets)), budgets, fontsize=7)
    return im


def plot_layer_bits(decisions: dict, layers: list[str], path: str, dpi: int, per_row: int = 30) -> Figure:
    """Per-layer bit-widths chosen by each method at each budget (colour: weight bits; text: w/a).

    More than `per_row` layers wrap into several rows of panels (one panel per method in each), so the
    figure stays about 12.5 inches wide at most; cell text is left out when cells are too small for it.

    Args:
        decisions: {method: {budget: [(w_bits, a_bits) per candidate layer]}}.
    """
    methods = sorted(decisions)
    step = -(-len(layers) // -(-len(layers) // per_row)) if layers else 1  # balanced rows of <= per_row layers
    chunks = [range(i, min(i + step, len(layers))) for i in range(0, len(layers), step)] or [range(0)]
    cell_w = min(0.45, 10.0 / max(1, step))  # inches
    text = cell_w >= 0.3
    bits = [wb for m in methods for d in decisions[m].values() for wb, _ in d]
    norm = Normalize(1, max(8, *bits) if bits else 8)
    heights = [len(decisions[m]) or 1 for _ in chunks for m in methods] or [1]
    label_h = 0.06 * max((len(name) for name in layers), default=0) + 0.3  # rotated layer names
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(
            cell_w * max(1, len(chunks[0])) + 2.5,
            0.3 * sum(heights) + 0.25 * len(heights) + label_h * len(chunks),
        ),
        height_ratios=heights,
        squeeze=False,
        layout="constrained",
    )
    im = None
    for k, cols in enumerate(chunks):
        for i, method in enumerate(methods):
            ax = axes[k * len(methods) + i, 0]
            im = _layer_bits_panel(ax, decisions[method], sorted(decisions[method]), cols, norm, text)
            last = i == len(methods) - 1
            ax.set_xticks(
                range(len(cols)), [layers[c] for c in cols] if last else [""] * len(cols), rotation=90, fontsize=6
            )
            ax.set_xlim(-0.5, len(chunks[0]) - 0.5)  # a short last row keeps the cell width
            ax.set_ylabel(method, fontsize=8)
        if len(chunks) > 1 and methods:
            axes[k * len(methods), 0].set_title(f"layers {cols.start + 1}-{cols.stop} of {len(layers)}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.8, aspect=30, label="weight bits")
    cell = "cell text: weight bits / input-activation bits; " if text else ""
    axes[-1, 0].set_xlabel(f"candidate layer ({cell}colour: weight bits)")
    fig.suptitle("Per-layer bit-widths of the chosen decisions (first set of the largest size)")
    return save_png(fig, path, dpi)


def first_set_choices(df: pd.DataFrame) -> dict:
    """{method: {budget: [(w, a) per candidate layer]}} for the first set of the largest size."""
    searched = df[df.method != "uniform"].dropna(subset=["choice"])
    if searched.empty:
        return {}
    n = searched.set_size.max()
    first = searched[(searched.set_size == n) & (searched.set_id == searched[searched.set_size == n].set_id.min())]
    out: dict = {}
    for row in first.itertuples():
        out.setdefault(row.method, {})[row.budget] = [parse_option(o) for o in row.choice.split()]
    return out
