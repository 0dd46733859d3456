"""Stage `ptq`: uniform low-bit post-training quantization with the ACIQ paper's schemes (Banner et al. 2019).

Usage (what workflow_scripts/ptq_variant.py calls; its table and plot: stage `ptq_report`):
    ptq_variant("aciq", model_cfg, quant, ptq_cfg, seed, evaluation, runtime, "results/m/model.pt",
                "results/m/ptq/aciq.json")

A variant is a set of overrides of the config's ``quant`` section (deep-merged into the weight and
activation schemes, see :data:`VARIANTS`). Each variant calibrates the FP model afresh and evaluates
every configured option (``ptq.options``, e.g. w4a4) uniformly: all candidate layers at that option,
the first/last layers as ``quant.fixed_bits`` / ``quant.fix_first_last`` fix them.
"""

from __future__ import annotations

import copy
import logging
import sys

from tqdm import tqdm

from ..artifacts import fp_metrics
from ..config import EvaluationConfig, ModelConfig, PtqConfig, QuantConfig, Runtime
from ..context import calibrated_context
from ..evaluate import evaluate_assignment
from ..io import save_json
from ..names import parse_option

__all__ = ["VARIANTS", "variant_quant", "ptq_variant"]
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
    vquant = variant_quant(quant, ptq, variant)
    ctx = calibrated_context(model, vquant, seed, runtime, checkpoint)
    fp = fp_metrics(checkpoint)
    rows = []
    for option in tqdm(ptq.options, desc=f"ptq {variant}", unit="option", mininterval=2, delay=5, file=sys.stderr):
        m = evaluate_assignment(ctx, ctx.table.uniform_assignment(parse_option(option)), evaluation.batch_size)
        m.pop("assignment")
        rows.append({"variant": variant, "option": option, **m, "fp_top1": fp["top1"]})
        log.info("ptq %s %s: top1 %.4f (FP %.4f)", variant, option, m["top1"], fp["top1"])
    out = {"variant": variant, "quant": vquant.to_dict(), "fp_top1": fp["top1"], "rows": rows}
    if out_json is not None:
        save_json(out_json, out)
    return out
