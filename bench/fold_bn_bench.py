"""BatchNorm folding: held-out top-1 of every uniform option, calibrated with and without quant.fold_bn.

Usage:
    PYTHONPATH=. .venv/bin/python bench/fold_bn_bench.py                        # config.yaml's first model
    PYTHONPATH=. .venv/bin/python bench/fold_bn_bench.py --checkpoint results/digits_resnet20/model.pt

Trains the model with the train stage (or loads --checkpoint when it exists, writing it otherwise),
then for fold_bn false and true calibrates a quantizer the way the calibrate stage does
(context.calibrated_context: the config's schemes and calibration samples) and evaluates each
option of w_bits x a_bits uniformly (every candidate layer at the option, first/last layers at
quant.fixed_bits), as the evaluate stage does. Prints one row per option and the last line
`fold - no fold, mean top-1 over the options: X.XXXX`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see clado_bench.py: spinning collapses on 2 shared cores

import yaml  # noqa: E402

from mpqflow.config import Config, QuantConfig, validate_config  # noqa: E402
from mpqflow.context import calibrated_context  # noqa: E402
from mpqflow.evaluate import evaluate_assignment  # noqa: E402
from mpqflow.names import option_name  # noqa: E402
from mpqflow.stages import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--model", default=None, help="model key (default: the config's first)")
    parser.add_argument("--checkpoint", default="/tmp/fold_bn_bench/model.pt")
    parser.add_argument("--weight-granularity", choices=["per_channel", "per_tensor"], default=None,
                        help="override quant.weight.granularity (default: the config's)")  # fmt: skip
    args = parser.parse_args()
    cfg = Config.from_dict(validate_config(yaml.safe_load(Path(args.config).read_text())))
    name = args.model or next(iter(cfg.models))
    model = cfg.models[name]
    if not Path(args.checkpoint).exists():
        Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        fp = train.train_or_load(model, cfg.seed, cfg.evaluation, cfg.runtime, args.checkpoint)
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s: FP top-1 {fp['top1']:.4f}")
    top1: dict[bool, dict[str, float]] = {}
    for fold_bn in (False, True):
        q = cfg.quant.to_dict()
        if args.weight_granularity:
            q["weight"] = {**q["weight"], "granularity": args.weight_granularity}
        quant = QuantConfig.from_dict({**q, "fold_bn": fold_bn})
        ctx = calibrated_context(model, quant, cfg.seed, cfg.runtime, args.checkpoint)
        top1[fold_bn] = {
            option_name(o): evaluate_assignment(ctx, ctx.table.uniform_assignment(o), cfg.evaluation.batch_size)["top1"]
            for o in ctx.table.options
        }
        fp = evaluate_assignment(ctx, {}, cfg.evaluation.batch_size)["top1"]
        print(f"fold_bn={fold_bn}: {len(ctx.table.folded_bn)} BatchNorms folded, FP top-1 {fp:.4f}, weights "
              f"{quant.weight['granularity']}")  # fmt: skip
    print(f"{'option':8s} {'no fold':>8s} {'fold':>8s} {'diff':>8s}")
    for o in top1[False]:
        print(f"{o:8s} {top1[False][o]:8.4f} {top1[True][o]:8.4f} {top1[True][o] - top1[False][o]:+8.4f}")
    mean_diff = sum(top1[True][o] - top1[False][o] for o in top1[False]) / len(top1[False])
    print(f"fold - no fold, mean top-1 over the options: {mean_diff:+.4f}")


if __name__ == "__main__":
    main()
