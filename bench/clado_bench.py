"""CLADO engine benchmark: pairs per second of the reference and fast engines, and one full per-batch run.

Usage:
    .venv/bin/python bench/clado_bench.py                 # digits ResNet-20 + torchvision ResNet-18
    .venv/bin/python bench/clado_bench.py --no-resnet18 --no-full

Digits ResNet-20 uses results/digits_resnet20/{model,calibration}.pt when both exist (the workflow's
trained model); otherwise a randomly initialised ResNet-20 calibrated on digits here (loss values are
then not representative, speed is). Figures printed:
    1. ResNet-20, options W{2,4,8}xA8, one batch of 64: pairs/s of both engines (all passes, base and
       singles included, divided into the pair count), their largest difference, `speedup: X.XX`.
    2. torchvision ResNet-18 at 32x32 input, the same options, --r18-batch samples.
    3. one full per-batch CLADO with the default option table A{4,8}xW{2,4,8} (120 options, 64
       samples) on the fast engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. On a shared 2-core machine spinning threads collapse
# under oversubscription (measured: a ResNet-20 forward took 789 ms instead of 6.5 ms while two
# other jobs ran); with a quiet machine the setting makes no measurable difference.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402 (after the OpenMP setting)
import torch  # noqa: E402

from mpqflow.data import DataSpec, SamplePlan, load_split, stack  # noqa: E402
from mpqflow.models import build_model  # noqa: E402
from mpqflow.sensitivity import compute_batch  # noqa: E402
from mpqflow.sensitivity.common import make_context  # noqa: E402
from mpqflow.sensitivity.fx_engine import pair_count  # noqa: E402
from mpqflow.validation import schema_defaults  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
W_A8 = ((8, 8), (4, 8), (2, 8))


def digits_batches(batch: int):
    """Calibration samples and one sensitivity batch of digits (the workflow's sample plan)."""
    train = load_split(DataSpec("digits"), "train")
    plan = SamplePlan(len(train), 256, 1, batch, seed=0)
    return stack(train, plan.calibration()), stack(train, plan.pool_batch(0))


def digits_context(batch: int):
    """(ctx, x, y): the workflow's trained ResNet-20 if present, else a fresh one calibrated here."""
    model, calib = ROOT / "results/digits_resnet20/model.pt", ROOT / "results/digits_resnet20/calibration.pt"
    (xc, _), (x, y) = digits_batches(batch)
    if model.is_file() and calib.is_file():
        import yaml

        from mpqflow.config import Config, Runtime, validate_config
        from mpqflow.context import load_context

        with open(ROOT / "config.yaml") as f:
            cfg = Config.from_dict(validate_config(yaml.safe_load(f)))
        runtime = Runtime(cfg.device, threads=2, collective_timeout_s=cfg.collective_timeout_s)
        ctx = load_context(cfg.models["digits_resnet20"], cfg.quant, cfg.seed, runtime, str(model), str(calib))
        print(f"model: trained digits ResNet-20 from {model}")
    else:
        torch.manual_seed(0)
        ctx = make_context(build_model("resnet20", 1, 10), xc, w_bits=(2, 4, 8), a_bits=(4, 8))
        print("model: random-init digits ResNet-20 calibrated on 256 digits samples (no results/ checkpoint)")
    return ctx, x.to(ctx.device), y.to(ctx.device)


def with_options(ctx, options):
    """The same context with another option table (the quantizer is calibrated for all bits)."""
    return dataclasses.replace(ctx, table=dataclasses.replace(ctx.table, options=tuple(options)))


def run(ctx, x, y, engine: str):
    t0 = time.perf_counter()
    payload = compute_batch(
        "clado", ctx, x, y, {**schema_defaults("sensitivity"), "clado_engine": engine, "progress": False}
    )
    return time.perf_counter() - t0, payload


def compare(name: str, ctx, x, y, reference: bool = True) -> float:
    L, K = len(ctx.table.candidates), len(ctx.table.options)
    pairs = pair_count(L, K)
    print(f"\n{name}: {L} candidate layers x {K} options, batch {x.shape[0]}, {pairs} pairs")
    t_fast, fast = run(ctx, x, y, "fast")
    print(f"  fast      {t_fast:8.2f} s  {pairs / t_fast:9.1f} pairs/s")
    if not reference:
        return float("nan")
    t_ref, ref = run(ctx, x, y, "reference")
    print(f"  reference {t_ref:8.2f} s  {pairs / t_ref:9.1f} pairs/s")
    diff = max(float(np.max(np.abs(np.asarray(ref[k]) - np.asarray(fast[k])))) for k in ref) / x.shape[0]
    print(f"  max |reference - fast| of per-sample means: {diff:.2e}")
    return t_ref / t_fast


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-resnet18", action="store_true", help="skip torchvision ResNet-18")
    p.add_argument("--no-full", action="store_true", help="skip the full 120-option run")
    p.add_argument("--r18-batch", type=int, default=16, help="ResNet-18 batch size (32x32 inputs)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("mpqflow").setLevel(logging.WARNING)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average at start {os.getloadavg()[0]:.2f}"
    )

    ctx, x, y = digits_context(64)
    speedup = compare("digits ResNet-20, W{2,4,8}xA8", with_options(ctx, W_A8), x, y)
    print(f"  speedup (reference time / fast time): {speedup:.2f}")

    if not args.no_resnet18:
        torch.manual_seed(0)
        xr = torch.randn(64 + args.r18_batch, 3, 32, 32)
        rctx = make_context(build_model("torchvision:resnet18", 3, 10), xr[:64], w_bits=(2, 4, 8), a_bits=(8,))
        r18 = compare(
            "torchvision ResNet-18 at 32x32, W{2,4,8}xA8", rctx, xr[64:], torch.randint(0, 10, (args.r18_batch,))
        )
        print(f"  speedup (reference time / fast time): {r18:.2f}")

    if not args.no_full:
        full = with_options(ctx, [(w, a) for w in (8, 4, 2) for a in (8, 4)])
        t, _ = run(full, x, y, "fast")
        n = len(full.table.candidates) * len(full.table.options)
        print(f"\nfull per-batch CLADO, default table ({n} options, {x.shape[0]} samples), fast engine: {t:.1f} s")

    print(f"\nspeedup: {speedup:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
