"""PTQ study: uniform low-bit post-training quantization with the ACIQ paper's schemes (Banner et al. 2019).

    rows = ptq_variant(cfg, "digits_resnet20", "results/.../model.pt", "results/.../ptq/aciq.json")
    df = ptq_table(["results/.../ptq/naive.json", "results/.../ptq/aciq.json"])
    ptq_plot(df, "results/.../plots/ptq.png")

A variant is a set of overrides of the config's ``quant`` section (deep-merged into the weight and
activation schemes, see :data:`VARIANTS`). Each variant calibrates the FP model afresh and evaluates
every configured option (``ptq.options``, e.g. w4a4) uniformly: all candidate layers at that option,
the first/last layers as ``quant.fixed_bits`` / ``quant.fix_first_last`` fix them.
"""

from __future__ import annotations

import copy
import logging

import pandas as pd
import torch

from .data import SamplePlan, iterate, load_split, stack
from .io import atomic_path, save_json
from .models import file_sha256
from .pipeline import (Context, _quantizer, evaluate_assignment, layer_table, load_model, parse_option,
                       resolve_device)
from .train import seed_everything

__all__ = ["VARIANTS", "variant_quant", "ptq_variant", "ptq_table", "ptq_plot", "write_ptq_table", "plot_ptq_table"]
log = logging.getLogger("mpqflow")

_MINMAX = {"weight": {"observer": "minmax"}, "activation": {"observer": "minmax"}}
_ACIQ = {"weight": {"observer": "aciq_laplace"}, "activation": {"observer": "aciq_laplace"}}
_ALLOC = {"weight": {"granularity": "per_channel", "bit_allocation": True},
          "activation": {"granularity": "per_channel", "bit_allocation": True}}
_BIAS = {"weight": {"bias_correction": "bias_variance"}}


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for p in parts:
        for kind, over in p.items():
            out.setdefault(kind, {}).update(over)
    return out


# variant -> overrides of quant.weight / quant.activation (the ACIQ paper's table, Banner et al. 2019)
VARIANTS: dict[str, dict] = {
    "naive": _MINMAX,  # running min/max ranges
    "aciq": _ACIQ,  # + analytical clipping (Laplace prior), weights and activations
    "aciq_alloc": _merge(_ACIQ, _ALLOC),  # + per-channel bit allocation
    "bias_corr": _merge(_MINMAX, _BIAS),  # min/max + bias (and variance) correction of weights
    "aciq_bias": _merge(_ACIQ, _BIAS),  # ACIQ + bias correction
    "all": _merge(_ACIQ, _ALLOC, _BIAS),  # ACIQ + bit allocation + bias correction
}


def variant_quant(cfg: dict, variant: str) -> dict:
    """The config's ``quant`` section with the variant's overrides, and w_bits / a_bits = the bits of ``ptq.options``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown PTQ variant {variant!r}; known: {sorted(VARIANTS)}")
    q = copy.deepcopy(cfg["quant"])
    for kind, over in VARIANTS[variant].items():
        q[kind] = {**q.get(kind, {}), **over}
    opts = [parse_option(o) for o in cfg["ptq"]["options"]]
    q["w_bits"] = sorted({w for w, _ in opts})
    q["a_bits"] = sorted({a for _, a in opts})
    return q


def _calibrated_context(cfg: dict, model: str, checkpoint: str) -> Context:
    """Load the FP model and calibrate a fresh quantizer on the config's calibration samples."""
    device = resolve_device(cfg)
    seed_everything(cfg["seed"])
    net = load_model(cfg, model, checkpoint, device)
    ctx = Context(cfg, model, net, None, None, file_sha256(checkpoint), device)  # type: ignore[arg-type]
    train = ctx.train_set
    plan = SamplePlan(len(train), cfg["quant"]["calibration_samples"], 0, 1, cfg["seed"])
    example, _ = stack(train, plan.calibration()[:2])
    ctx.table = layer_table(cfg, net, example.to(device))
    ctx.quantizer = _quantizer(cfg, net, ctx.table)
    workers = cfg["models"][model]["dataset"]["workers"]
    bs = cfg["quant"]["calibration_batch_size"]
    ctx.quantizer.calibrate(x.to(device) for x, _ in iterate(train, bs, plan.calibration(), workers))
    return ctx


def ptq_variant(cfg: dict, model: str, checkpoint: str, out_json: str | None = None) -> dict:
    """Calibrate with one variant's scheme and evaluate each ``ptq.options`` option uniformly.

    Args:
        cfg: validated config (sections seed, quant, evaluation, models, ptq) plus ``variant``: the
            variant's name.
        model: configured model name.
        checkpoint: the FP checkpoint (results/{model}/model.pt).
        out_json: where to write the result (atomically); None writes nothing.
    Returns:
        {variant, quant (the effective quant section), fp_top1, rows: [{variant, option, top1, top5,
        loss, size_mb, avg_bits, gbitops, weight_entropy_bits, act_entropy_bits}, ...]}.
    """
    variant = cfg["variant"]
    vcfg = {**cfg, "quant": variant_quant(cfg, variant)}
    ctx = _calibrated_context(vcfg, model, checkpoint)
    fp = torch.load(checkpoint, map_location="cpu", weights_only=False)["fp_metrics"]
    rows = []
    for option in cfg["ptq"]["options"]:
        m = evaluate_assignment(ctx, ctx.uniform_assignment(parse_option(option)))
        m.pop("assignment")
        rows.append({"variant": variant, "option": option, **m, "fp_top1": fp["top1"]})
        log.info("ptq %s %s: top1 %.4f (FP %.4f)", variant, option, m["top1"], fp["top1"])
    out = {"variant": variant, "quant": vcfg["quant"], "fp_top1": fp["top1"], "rows": rows}
    if out_json is not None:
        save_json(out_json, out)
    return out


def ptq_table(results: list) -> pd.DataFrame:
    """One row per (variant, option) from :func:`ptq_variant` results (dicts or JSON paths)."""
    from .io import load_json

    rows = []
    for r in results:
        rows.extend((r if isinstance(r, dict) else load_json(r))["rows"])
    return pd.DataFrame(rows)


def ptq_plot(df: pd.DataFrame, png: str, dpi: int = 150, width: float = 6.0) -> None:
    """Grouped bar chart: x = option, one bar per variant, y = top-1 (%); FP top-1 as a dashed line.

    The y axis starts just below the worst bar (not at 0), so every bar carries its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
            ax.annotate(f"{val:.1f}", (xi, val), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x, [o.upper() for o in options])
    ax.set_xlabel("uniform option (weight bits, activation bits)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Post-training quantization: naive min/max vs ACIQ schemes")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def write_ptq_table(results: list, csv: str) -> pd.DataFrame:
    """:func:`ptq_table` of the variants' JSON paths (or dicts), written atomically to `csv`."""
    df = ptq_table(results)
    with atomic_path(csv) as tmp:
        df.to_csv(tmp, index=False)
    return df


def plot_ptq_table(csv: str, png: str, plots: dict | None = None) -> None:
    """:func:`ptq_plot` of a table written by :func:`write_ptq_table`, sized by the config's ``plots``
    section (dpi, panel_width; None uses the defaults)."""
    plots = plots or {}
    ptq_plot(pd.read_csv(csv), png, dpi=plots.get("dpi", 150), width=1.2 * plots.get("panel_width", 5.0))
