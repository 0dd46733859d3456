"""HAWQ's per-layer Hessian traces on a real model: the stated-precision stopping rule against 200-probe
PyHessian traces and a long Hutchinson reference.

Usage (after `snakemake --cores 2 results/<model>/calibration.pt`, from the repository root):
    .venv/bin/python bench/hawq_traces_bench.py                        # config.yaml, its first model
    .venv/bin/python bench/hawq_traces_bench.py --batches 0 1 --reference-probes 2000
    pip install pyhessian   # optional: the 200-probe and PyHessian-rule columns then come from PyHessian

For each pool batch and candidate layer it prints: the probes the config's rule (hawq_rel_se,
hawq_min_probes, hawq_max_probes) used, the standard error it reports relative to its trace, the
relative difference of its trace from a 200-probe trace (PyHessian's `hessian.trace(maxIter=200)`
with no early stop, restricted to the layer, when PyHessian is installed; else the project's own
Hutchinson with 200 probes) and from a `--reference-probes` Hutchinson trace (other seed), and, with
PyHessian, what PyHessian's own rule (tol 1e-3, at most 100 probes) gives. Traces are of the base
model's mean cross-entropy (fixed layers quantized, candidates FP), as in the sensitivity files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpqflow.config import Config, validate_config  # noqa: E402
from mpqflow.context import load_context  # noqa: E402
from mpqflow.data import pool_batch_indices, stack  # noqa: E402
from mpqflow.sensitivity import compute_batch  # noqa: E402
from mpqflow.sensitivity.hawq import hutchinson_traces  # noqa: E402
from mpqflow.validation import schema_defaults  # noqa: E402


def own_traces(ctx, x, y, probes: int, seed: int) -> np.ndarray:
    """(L,) Hutchinson traces of the mean loss with exactly `probes` probes per layer."""
    modules = dict(ctx.net.named_modules())
    weights = [modules[l].weight for l in ctx.table.candidates]
    with ctx.quantizer.applied(ctx.table.fixed), torch.enable_grad():
        for w in weights:
            w.requires_grad_(True)
        loss = F.cross_entropy(ctx.net(x), y)
        # exactly `probes` probes (min = max), the schema's deflation sketch
        hawq = {k.removeprefix("hawq_"): v for k, v in schema_defaults("sensitivity").items() if k.startswith("hawq_")}
        traces, _, _ = hutchinson_traces(
            loss, weights, **{**hawq, "max_probes": probes, "min_probes": probes, "seed": seed}
        )
    return traces.cpu().numpy()


def pyhessian_traces(ctx, x, y, max_iter: int, tol: float) -> tuple[np.ndarray, list[int]] | None:
    """(L,) PyHessian traces, one layer at a time (only its weight requires grad); None without PyHessian."""
    try:
        from pyhessian import hessian
    except ImportError:
        return None
    modules = dict(ctx.net.named_modules())
    params = list(ctx.net.parameters())
    flags = [p.requires_grad for p in params]
    out, used = [], []
    try:
        with ctx.quantizer.applied(ctx.table.fixed):
            for layer in ctx.table.candidates:
                for p in params:
                    p.requires_grad_(False)
                modules[layer].weight.requires_grad_(True)
                torch.manual_seed(len(out))
                h = hessian(ctx.net, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)
                vhv = h.trace(maxIter=max_iter, tol=tol)
                out.append(float(np.mean(vhv)))
                used.append(len(vhv))
                ctx.net.zero_grad(set_to_none=True)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return np.asarray(out), used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--model", default=None, help="a key of models (default: the first)")
    ap.add_argument("--batches", type=int, nargs="+", default=[0], help="pool batch indices")
    ap.add_argument("--reference-probes", type=int, default=1000)
    args = ap.parse_args()
    with open(args.config) as f:
        cfg = Config.from_dict(validate_config(yaml.safe_load(f)))
    name = args.model or next(iter(cfg.models))
    res = Path("results") / name
    torch.set_num_threads(1)
    ctx = load_context(
        cfg.models[name], cfg.quant, cfg.seed, cfg.runtime, str(res / "model.pt"), str(res / "calibration.pt")
    )
    settings = cfg.sensitivity.of_estimator("hawq")
    print(f"{name}: {len(ctx.table.candidates)} candidate layers; rule {settings}; torch {torch.__version__}")
    within = []
    for b in args.batches:
        x, y = stack(ctx.train_set, pool_batch_indices(len(ctx.train_set), cfg.sample_plan, b))
        x, y = x.to(ctx.device), y.to(ctx.device)
        t0 = time.perf_counter()
        payload = compute_batch("hawq", ctx, x, y, {**settings, "progress": False})
        t_rule = time.perf_counter() - t0
        n = float(payload["count"])
        rule = payload["trace_sum"] / n
        rel_se = np.sqrt(payload["trace_var_sum"]) / np.abs(payload["trace_sum"])
        t0 = time.perf_counter()
        ph = pyhessian_traces(ctx, x, y, 200, 0.0)
        source = "pyhessian" if ph is not None else "own"
        t200 = own_traces(ctx, x, y, 200, seed=1) if ph is None else ph[0]
        t_200 = time.perf_counter() - t0
        ph_rule = pyhessian_traces(ctx, x, y, 100, 1e-3)
        t0 = time.perf_counter()
        ref = own_traces(ctx, x, y, args.reference_probes, seed=2)
        t_ref = time.perf_counter() - t0
        print(
            f"\nbatch {b} ({int(n)} samples): rule {t_rule:.1f} s, {int(payload['probes_sum'].sum())} probes; "
            f"200-probe ({source}) {t_200:.1f} s; {args.reference_probes}-probe reference {t_ref:.1f} s"
        )
        head = f"| layer | numel | probes | rule SE/trace | rule vs 200-probe {source} | rule vs reference |"
        head += " 200-probe vs reference |" + (" PyHessian rule: probes, vs reference |" if ph_rule else "")
        print(head + "\n|" + "---|" * (head.count("|") - 1))
        for l, layer in enumerate(ctx.table.candidates):
            d200, dref = rule[l] / t200[l] - 1, rule[l] / ref[l] - 1
            within.append(abs(d200) <= 0.10)
            row = f"| {layer} | {ctx.table.numel[layer]} | {int(payload['probes_sum'][l])} | {rel_se[l]:.3f} |"
            row += f" {d200:+.3f} | {dref:+.3f} | {t200[l] / ref[l] - 1:+.3f} |"
            if ph_rule:
                row += f" {ph_rule[1][l]}, {ph_rule[0][l] / ref[l] - 1:+.3f} |"
            print(row)
    print(f"\nrule within 10 % of the 200-probe trace: {sum(within)} of {len(within)} layer-batches")


if __name__ == "__main__":
    main()
