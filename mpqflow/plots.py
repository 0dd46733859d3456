"""The variance study's figures: PNG files with titles, labelled axes, units and legends.

Usage:
    df = pd.read_csv("results/m/study.csv")
    plot_accuracy_vs_size(df, "accuracy_vs_size.png", dpi=150, width=5.0)
    ptq_plot(pd.read_csv("results/m/ptq.csv"), "ptq.png")
(:mod:`mpqflow.stages.study` draws them all from the study's files.)
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from .io import atomic_path, save_csv  # noqa: E402
from .names import parse_option  # noqa: E402
from .study import pareto_auc, running_best  # noqa: E402

__all__ = [
    "plot_accuracy_vs_size",
    "plot_pareto",
    "plot_estimated_vs_measured",
    "plot_interaction_heatmap",
    "plot_layer_bits",
    "first_set_choices",
    "ptq_plot",
]


def _colors(methods) -> dict:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(methods))}


def _save(fig, path: str, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)


def _fp_line(ax, df: pd.DataFrame) -> None:
    fp = df.fp_top1.dropna()
    if len(fp):
        ax.axhline(100 * fp.iloc[0], color="grey", lw=1, ls=":", label="full precision")


def plot_accuracy_vs_size(df: pd.DataFrame, path: str, dpi: int = 150, width: float = 5.0) -> None:
    """Top-1 vs size per method, mean ± std over set ids, one panel per set size; uniform as reference."""
    searched, uniform = df[df.method != "uniform"], df[df.method == "uniform"].sort_values("size_mb")
    sizes = sorted(searched.set_size.dropna().unique()) or [None]
    colors = _colors(searched.method.unique())
    fig, axes = plt.subplots(1, len(sizes), figsize=(width * len(sizes), 4), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for method, g in searched[searched.set_size == n].groupby("method"):
            stats = (
                g.groupby("budget")
                .agg(x=("size_mb", "mean"), x_std=("size_mb", "std"), y=("top1", "mean"), y_std=("top1", "std"))
                .sort_values("x")
            )
            ax.errorbar(
                stats.x,
                100 * stats.y,
                xerr=stats.x_std.fillna(0),
                yerr=100 * stats.y_std.fillna(0),
                marker="o",
                ms=4,
                capsize=3,
                color=colors[method],
                label=method,
            )
        ax.plot(uniform.size_mb, 100 * uniform.top1, "k--s", ms=4, lw=1, label="uniform")
        _fp_line(ax, df)
        n_sets = searched[searched.set_size == n].set_id.nunique()
        ax.set_title(f"sensitivity sets of {int(n)} batch(es), n={n_sets} sets" if n is not None else "uniform")
        ax.set_xlabel("model size (MB of quantized weights)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out top-1 accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle("Accuracy vs size per method (mean ± std over sensitivity sets)")
    _save(fig, path, dpi)


def plot_pareto(df: pd.DataFrame, path: str, auc_csv: str, dpi: int = 150, width: float = 5.0) -> pd.DataFrame:
    """Running-best Pareto curves (mean ± std over sets) and their AUC per method; writes the AUC table."""
    auc = pareto_auc(df)
    save_csv(auc_csv, auc)
    searched = df[df.method != "uniform"]
    colors = _colors(searched.method.unique())
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(2 * width, 4))
    if not searched.empty:
        grid = np.linspace(searched.size_mb.min(), searched.size_mb.max(), 200)
        for method, g in searched.groupby("method"):
            curves = np.array(
                [
                    running_best(h.size_mb.to_numpy(), h.top1.to_numpy(), grid)
                    for _, h in g.groupby(["set_size", "set_id"])
                ]
            )
            mean, std = np.nanmean(curves, 0), np.nanstd(curves, 0)
            ax.plot(grid, 100 * mean, color=colors[method], label=method, drawstyle="steps-post")
            ax.fill_between(grid, 100 * (mean - std), 100 * (mean + std), color=colors[method], alpha=0.15, step="post")
        stats = auc.groupby("method").auc.agg(["mean", "std"]).sort_values("mean")
        bx.barh(
            stats.index,
            100 * stats["mean"],
            xerr=100 * stats["std"].fillna(0),
            capsize=3,
            color=[colors[m] for m in stats.index],
        )
        lo = 100 * (stats["mean"] - stats["std"].fillna(0)).min()
        bx.set_xlim(max(0.0, lo - 2), 100 * (stats["mean"] + stats["std"].fillna(0)).max() + 1)
    _fp_line(ax, df)
    ax.set(
        xlabel="model size (MB of quantized weights)",
        ylabel="best top-1 at or below this size (%)",
        title="Running-best Pareto curves (mean ± std over sets)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    bx.set(xlabel="normalised area under the Pareto curve (% top-1)", title="Pareto AUC per method (mean ± std)")
    bx.grid(alpha=0.3, axis="x")
    _save(fig, path, dpi)
    return auc


def plot_estimated_vs_measured(df: pd.DataFrame, path: str, dpi: int = 150, width: float = 5.0) -> None:
    """Each method's estimated loss increase for its decisions against the measured one (the sanity check)."""
    searched = df[df.method != "uniform"].dropna(subset=["estimated_loss_increase", "measured_loss_increase"])
    colors = _colors(searched.method.unique())
    fig, ax = plt.subplots(figsize=(width * 1.3, width))
    for method, g in searched.groupby("method"):
        ax.scatter(
            g.measured_loss_increase, g.estimated_loss_increase, s=18, alpha=0.8, color=colors[method], label=method
        )
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
        title="Estimated vs measured loss increase of chosen decisions",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, dpi)


def plot_interaction_heatmap(G: np.ndarray, layers: list[str], options: list, path: str, dpi: int = 150) -> None:
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
    _save(fig, path, dpi)


def plot_layer_bits(decisions: dict, layers: list[str], path: str, dpi: int = 150) -> None:
    """Per-layer bit-widths chosen by each method at each budget (colour: weight bits; text: w/a).

    Args:
        decisions: {method: {budget: [(w_bits, a_bits) per candidate layer]}}.
    """
    methods = sorted(decisions)
    fig, axes = plt.subplots(
        len(methods) or 1,
        1,
        figsize=(max(8, 0.45 * len(layers)), 1.1 + 0.5 * sum(len(decisions[m]) for m in methods) + 0.4 * len(methods)),
        squeeze=False,
    )
    for ax, method in zip(axes[:, 0], methods):
        budgets = sorted(decisions[method])
        w = np.array([[wb for wb, _ in decisions[method][b]] for b in budgets], float)  # (budgets, layers)
        ax.imshow(w, cmap="viridis", vmin=1, vmax=8, aspect="auto")
        for (r, c), _ in np.ndenumerate(w):
            wb, ab = decisions[method][budgets[r]][c]
            ax.text(c, r, f"{wb}/{ab}", ha="center", va="center", fontsize=6, color="w" if wb < 6 else "k")
        ax.set_yticks(range(len(budgets)), budgets, fontsize=7)
        ax.set_xticks(range(len(layers)), layers if ax is axes[-1, 0] else [""] * len(layers), rotation=90, fontsize=6)
        ax.set_ylabel(method, fontsize=8)
    axes[-1, 0].set_xlabel("candidate layer (cell text: weight bits / input-activation bits; colour: weight bits)")
    fig.suptitle("Per-layer bit-widths of the chosen decisions (first set of the largest size)")
    _save(fig, path, dpi)


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


def ptq_plot(df: pd.DataFrame, png: str, dpi: int = 150, width: float = 6.0) -> None:
    """Grouped bar chart: x = option, one bar per variant, y = top-1 (%); FP top-1 as a dashed line.

    The y axis starts just below the worst bar (not at 0), so every bar carries its value."""
    options = list(dict.fromkeys(df["option"]))
    variants = list(dict.fromkeys(df["variant"]))
    acc = df.pivot(index="option", columns="variant", values="top1").loc[options, variants] * 100
    x, w = np.arange(len(options)), 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(1.3 * width, 0.6 * width))
    for i, v in enumerate(variants):
        ax.bar(x + (i - (len(variants) - 1) / 2) * w, acc[v].to_numpy(), w, label=v)
    fp = 100 * float(df["fp_top1"].iloc[0])
    ax.axhline(fp, color="k", ls="--", lw=1, label="FP")
    lo = float(np.nanmin(acc.to_numpy()))  # zoom on the differences: the axis starts near the worst bar
    ax.set_ylim(max(0.0, np.floor(lo - 2 - 0.1 * (fp - lo))), min(100.0, max(fp, float(np.nanmax(acc.to_numpy()))) + 1))
    for i, v in enumerate(variants):  # the value on every bar: the axis does not start at 0
        for xi, val in zip(x + (i - (len(variants) - 1) / 2) * w, acc[v].to_numpy()):
            ax.annotate(
                f"{val:.1f}",
                (xi, val),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=6,
                rotation=90,
            )
    ax.set_xticks(x, [o.upper() for o in options])
    ax.set_xlabel("uniform option (weight bits, activation bits)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Post-training quantization: naive min/max vs ACIQ schemes")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
