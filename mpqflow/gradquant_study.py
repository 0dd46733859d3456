"""The gradient-quantization study's tables, figures and report, from its runs' JSON records.

Usage (what :mod:`mpqflow.stages.gradquant_report` does):
    table, curves = gradquant_tables([load_json(p) for p in paths])   # one row per run; (run, step, variance)
    plot_gradquant(table, curves, "variance.png", "accuracy.png", dpi=150, width=5.0)  # returns both figures
    text = gradquant_report(table)                                     # markdown, with the 3-bit verdict

The variance summary of a run is the mean normalised variance E||Q(g) - g||^2 / ||g||^2 over the
steps after the first level update (`after_step`, the same window for every run, so the fixed
levels of qsgd/nuqsgd are compared with the adapted ones over the same stretch of training).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .plotting import Figure, plt, save_png

__all__ = ["gradquant_tables", "plot_gradquant", "gradquant_report", "METHOD_ORDER", "RUN_FIELDS"]

RUN_FIELDS = (  # what gradquant_tables reads of a run's record
    "run", "method", "bits", "world_size", "epochs", "steps", "top1", "test_loss", "train_history", "variance",
    "level_refits", "bytes_sent_per_step", "bytes_fp32_per_step", "wire_bytes_per_step", "seconds", "settings",
)  # fmt: skip

METHOD_ORDER = ("none", "qsgd", "nuqsgd", "alq", "amq", "alq_nb", "amq_nb")
FIXED, ADAPTIVE = ("qsgd", "nuqsgd"), ("alq", "amq", "alq_nb", "amq_nb")
_SMOOTH = 10  # steps of the running median drawn over the per-step variance


def _first_update(records: list[dict]) -> int:
    iters = [i for r in records if r["settings"]["grad_quant"] for i in r["settings"]["grad_quant"]["update_iters"]]
    return min(iters, default=0)


def gradquant_tables(records: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per run: accuracy, loss, bytes, variance summary; long table run, method, bits, step, variance)."""
    if not records:
        raise ValueError("the gradient-quantization study has no runs")
    after = _first_update(records)
    base = next((r for r in records if r["method"] == "none"), None)
    rows, curves = [], []
    for r in records:
        var = np.array([v for _, v in r["variance"]], dtype=float)
        steps = np.array([s for s, _ in r["variance"]], dtype=int)
        window = var[steps > after] if (steps > after).any() else var
        wire = r["wire_bytes_per_step"]
        ref = None if base is None else base["wire_bytes_per_step"]
        rows.append({
            "run": r["run"], "method": r["method"], "bits": r["bits"], "world_size": r["world_size"],
            "epochs": r["epochs"], "steps": r["steps"], "top1": r["top1"], "test_loss": r["test_loss"],
            "train_loss": r["train_history"][-1]["loss"] if r["train_history"] else np.nan,
            "variance_after_update": float(window.mean()) if window.size else np.nan,
            "variance_final": float(var[-max(1, var.size // 10):].mean()) if var.size else np.nan,
            "after_step": after, "level_refits": r["level_refits"],
            "bytes_sent_per_step": r["bytes_sent_per_step"], "bytes_fp32_per_step": r["bytes_fp32_per_step"],
            "wire_bytes_per_step": wire,
            "wire_ratio_to_none": np.nan if wire is None or not ref else wire / ref,
            "seconds": r["seconds"],
        })  # fmt: skip
        curves += [{"run": r["run"], "method": r["method"], "bits": r["bits"], "step": s, "variance": v}
                   for s, v in zip(steps, var)]  # fmt: skip
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    table = pd.DataFrame(rows)
    table = table.assign(_none=table["method"] != "none").sort_values(
        ["_none", "bits", "method"], key=lambda c: c.map(order) if c.name == "method" else c
    )
    table = table.drop(columns="_none")
    cols = ["run", "method", "bits", "step", "variance"]
    return table.reset_index(drop=True), pd.DataFrame(curves, columns=cols)


def _colors() -> dict:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i) for i, m in enumerate(METHOD_ORDER)}


def _variance_figure(curves: pd.DataFrame, after: int, path: str, dpi: int, width: float) -> Figure:
    quantized = curves[curves["method"] != "none"]
    bits = sorted(quantized["bits"].unique())
    fig, axes = plt.subplots(1, max(1, len(bits)), figsize=(width * max(1, len(bits)), 0.8 * width), squeeze=False)
    colors = _colors()
    for ax, b in zip(axes[0], bits):
        for method in [m for m in METHOD_ORDER if m in set(quantized["method"])]:
            c = quantized[(quantized["bits"] == b) & (quantized["method"] == method)].sort_values("step")
            if c.empty:
                continue
            smooth = c["variance"].rolling(_SMOOTH, min_periods=1, center=True).median()
            style = "--" if method in FIXED else "-"
            ax.plot(c["step"], smooth, style, color=colors[method], lw=1.4, label=method)
        if after:
            ax.axvline(after, color="grey", ls=":", lw=1, label=f"first level update (step {after})")
        ax.set_yscale("log")
        ax.set_xlabel("iteration (optimizer step)")
        ax.set_ylabel(f"normalised variance E‖Q(g)−g‖² / ‖g‖²\n(running median of {_SMOOTH} steps, log)")
        ax.set_title(f"{b} bits per coordinate")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small", title="levels")
    fig.suptitle("Quantized gradient exchange:\nvariance of each process's quantized gradient during training")
    fig.tight_layout()
    return save_png(fig, path, dpi, tight=False)


def _accuracy_figure(table: pd.DataFrame, path: str, dpi: int, width: float) -> Figure:
    q = table[table["method"] != "none"]
    none = table[table["method"] == "none"]
    methods = [m for m in METHOD_ORDER if m in set(q["method"])]
    bits = sorted(q["bits"].unique())
    fig, (acc_ax, byte_ax) = plt.subplots(1, 2, figsize=(2.4 * width, 0.8 * width))
    colors, w = _colors(), 0.8 / max(1, len(methods))
    x = np.arange(len(bits))
    for i, m in enumerate(methods):
        rows = q[q["method"] == m].set_index("bits").reindex(bits)
        shift = (i - (len(methods) - 1) / 2) * w
        acc_ax.bar(x + shift, 100 * rows["top1"], w, color=colors[m], label=m)
        wire = rows["wire_bytes_per_step"].where(rows["wire_bytes_per_step"].notna(), rows["bytes_sent_per_step"])
        byte_ax.bar(x + shift, wire / 1e3, w, color=colors[m], label=m)
    if not none.empty:
        acc_ax.axhline(100 * none["top1"].iloc[0], color="k", ls="--", lw=1, label="none (float32 all-reduce)")
        ref = none["wire_bytes_per_step"].iloc[0]
        ref = none["bytes_sent_per_step"].iloc[0] if pd.isna(ref) else ref
        byte_ax.axhline(ref / 1e3, color="k", ls="--", lw=1, label="none (float32 all-reduce)")
    lo = float(np.nanmin(100 * table["top1"]))
    acc_ax.set_ylim(max(0.0, np.floor(lo - 3)), 100.5)
    for ax in (acc_ax, byte_ax):
        ax.set_xticks(x, [f"{b} bits" for b in bits])
        ax.set_xlabel("bits per gradient coordinate")
    acc_ax.set_ylabel("held-out top-1 accuracy (%)")
    acc_ax.set_title("Accuracy after training with quantized gradients")
    byte_ax.set_yscale("log")
    byte_ax.set_ylabel("bytes written to the wire per process and step (kB, log)")
    byte_ax.set_title("Communication per step (measured)")
    byte_ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_png(fig, path, dpi, tight=False)


def plot_gradquant(table: pd.DataFrame, curves: pd.DataFrame, variance_png: str, accuracy_png: str,
                   dpi: int, width: float = 5.0) -> tuple[Figure, Figure]:  # fmt: skip
    """The variance-vs-iteration figure (one panel per bits) and the accuracy / bytes figure, saved
    and returned (variance, accuracy)."""
    after = int(table["after_step"].iloc[0]) if len(table) else 0
    return _variance_figure(curves, after, variance_png, dpi, width), _accuracy_figure(table, accuracy_png, dpi, width)


def _verdict(table: pd.DataFrame, bits: int) -> str:
    """One sentence: at `bits`, does adaptive beat uniform (qsgd) and exponential (nuqsgd)?"""
    at = table[table["bits"] == bits].set_index("method")["variance_after_update"]
    fixed = {m: at[m] for m in FIXED if m in at}
    adaptive = {m: at[m] for m in ADAPTIVE if m in at}
    if not fixed or not adaptive:
        return f"At {bits} bits the study lacks fixed or adaptive levels to compare."
    best = min(adaptive, key=adaptive.get)
    ratios = ", ".join(f"{fixed[m] / adaptive[best]:.2f}x lower than {m} ({fixed[m]:.4g})" for m in fixed)
    beats = all(adaptive[best] < v for v in fixed.values())
    verb = "beat" if beats else "do not beat"
    every = ", ".join(f"{m} {v:.4g}" for m, v in adaptive.items())
    return (
        f"At {bits} bits, adaptive levels {verb} the fixed ones: the best, {best}, has normalised variance "
        f"{adaptive[best]:.4g}, {ratios} (mean over the steps after the first level update; adaptive: {every})."
    )


def gradquant_report(table: pd.DataFrame) -> str:
    """The study's markdown report: the verdict at 3 bits (or the middle bits studied) and the run table."""
    bits = sorted(b for b in table.loc[table["method"] != "none", "bits"].unique())
    pick = 3 if 3 in bits else (bits[len(bits) // 2] if bits else 3)
    cols = ["run", "top1", "test_loss", "variance_after_update", "variance_final", "level_refits",
            "bytes_sent_per_step", "wire_bytes_per_step", "wire_ratio_to_none", "seconds"]  # fmt: skip
    lines = [
        "# Quantized gradient exchange (ALQ / AMQ, QSGD, NUQSGD)",
        "",
        _verdict(table, pick),
        "",
        f"{int(table['world_size'].iloc[0])} processes, {int(table['epochs'].iloc[0])} epochs "
        f"({int(table['steps'].iloc[0])} steps). Variance: E||Q(g) - g||^2 / ||g||^2 of each process's gradient, "
        f"exact over the rounding draws, averaged over processes and over the steps after step "
        f"{int(table['after_step'].iloc[0])}. Wire bytes: measured (bytes the process wrote to its sockets "
        "during the exchange), per process and step.",
        "",
        "| " + " | ".join(cols) + " |",
        "| " + " | ".join("---" for _ in cols) + " |",
    ]
    for row in table[cols].itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.4g}"
    return str(v)
