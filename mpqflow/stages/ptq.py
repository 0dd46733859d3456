"""Stage `ptq`: uniform low-bit post-training quantization with the ACIQ paper's schemes (Banner et al. 2019).

Usage (what workflow_scripts/ptq_variant.py, ptq_table.py and ptq_plot.py call):
    ptq_variant("aciq", model_cfg, quant, ptq_cfg, seed, evaluation, runtime, "results/m/model.pt",
                "results/m/ptq/aciq.json")
    write_ptq_table(["results/m/ptq/naive.json", ...], "results/m/ptq.csv")
    plot_ptq_table("results/m/ptq.csv", "results/m/plots/ptq.png", plots_cfg)

A variant is a set of overrides of the config's ``quant`` section (deep-merged into the weight and
activation schemes, see :data:`VARIANTS`). Each variant calibrates the FP model afresh and evaluates
every configured option (``ptq.options``, e.g. w4a4) uniformly: all candidate layers at that option,
the first/last layers as ``quant.fixed_bits`` / ``quant.fix_first_last`` fix them.
"""

from __future__ import annotations

import copy
import logging

import pandas as pd

from ..config import EvaluationConfig, ModelConfig, PlotsConfig, PtqConfig, QuantConfig, Runtime
from ..io import load_json, save_csv, save_json
from ..names import parse_option

__all__ = ["VARIANTS", "variant_quant", "ptq_variant", "ptq_table", "write_ptq_table", "plot_ptq_table"]
log = logging.getLogger("mpqflow")

_MINMAX = {"weight": {"observer": "minmax"}, "activation": {"observer": "minmax"}}
_ACIQ = {"weight": {"observer": "aciq_laplace"}, "activation": {"observer": "aciq_laplace"}}
_ALLOC = {
    "weight": {"granularity": "per_channel", "bit_allocation": True},
    "activation": {"granularity": "per_channel", "bit_allocation": True},
}
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


def variant_quant(quant: QuantConfig, ptq: PtqConfig, variant: str) -> QuantConfig:
    """The ``quant`` section with the variant's overrides, and w_bits / a_bits = the bits of ``ptq.options``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown PTQ variant {variant!r}; known: {sorted(VARIANTS)}")
    q = copy.deepcopy(quant.to_dict())
    for kind, over in VARIANTS[variant].items():
        q[kind] = {**q.get(kind, {}), **over}
    opts = [parse_option(o) for o in ptq.options]
    q["w_bits"] = sorted({w for w, _ in opts})
    q["a_bits"] = sorted({a for _, a in opts})
    return QuantConfig.from_dict(q)


def ptq_variant(
    variant: str,
    model: ModelConfig,
    quant: QuantConfig,
    ptq: PtqConfig,
    seed: int,
    evaluation: EvaluationConfig,
    runtime: Runtime,
    checkpoint: str,
    out_json: str | None = None,
) -> dict:
    """Calibrate with one variant's scheme and evaluate each ``ptq.options`` option uniformly.

    Returns:
        {variant, quant (the effective quant section), fp_top1, rows: [{variant, option, top1, top5,
        loss, size_mb, avg_bits, gbitops, weight_entropy_bits, act_entropy_bits, fp_top1}, ...]};
        written atomically to `out_json` unless it is None.
    """
    from ..artifacts import fp_metrics  # torch: imported here so the table and plot jobs start fast
    from ..context import Context, calibrate_quantizer, data_spec, load_model, resolve_device
    from ..data import load_split
    from ..evaluate import evaluate_assignment
    from ..io import file_sha256
    from ..train import seed_everything

    vquant = variant_quant(quant, ptq, variant)
    device = resolve_device(runtime)
    seed_everything(seed)
    net = load_model(model, checkpoint, device, seed)
    spec = data_spec(model, seed)
    table, quantizer = calibrate_quantizer(net, load_split(spec, "train"), vquant, seed, device, model.dataset.workers)
    ctx = Context(net, quantizer, table, vquant, file_sha256(checkpoint), device, spec, model.dataset.workers)
    fp = fp_metrics(checkpoint)
    rows = []
    for option in ptq.options:
        m = evaluate_assignment(ctx, table.uniform_assignment(parse_option(option)), evaluation.batch_size)
        m.pop("assignment")
        rows.append({"variant": variant, "option": option, **m, "fp_top1": fp["top1"]})
        log.info("ptq %s %s: top1 %.4f (FP %.4f)", variant, option, m["top1"], fp["top1"])
    out = {"variant": variant, "quant": vquant.to_dict(), "fp_top1": fp["top1"], "rows": rows}
    if out_json is not None:
        save_json(out_json, out)
    return out


def ptq_table(results: list) -> pd.DataFrame:
    """One row per (variant, option) from :func:`ptq_variant` results (dicts or JSON paths)."""
    rows = []
    for r in results:
        rows.extend((r if isinstance(r, dict) else load_json(r))["rows"])
    return pd.DataFrame(rows)


def write_ptq_table(results: list, csv: str) -> pd.DataFrame:
    """:func:`ptq_table` of the variants' JSON paths (or dicts), written atomically to `csv`."""
    df = ptq_table(results)
    save_csv(csv, df, float_format=None)  # full precision: the table feeds the plot
    return df


def plot_ptq_table(csv: str, png: str, plots: PlotsConfig) -> None:
    """:func:`mpqflow.plots.ptq_plot` of a table written by :func:`write_ptq_table`."""
    from ..plots import ptq_plot

    ptq_plot(pd.read_csv(csv), png, dpi=plots.dpi, width=1.2 * plots.panel_width)
