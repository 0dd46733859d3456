"""How far LIMPQ's indicator runs moved the step sizes from where they started, per set and bit-width.

Usage (after a study with method limpq, from the repository root):
    .venv/bin/python bench/limpq_indicator_drift.py                       # config.yaml, its first model
    .venv/bin/python bench/limpq_indicator_drift.py --config my.yaml --model m

For every results/<model>/sensitivity/limpq/set_*.npz it prints, per bit-width column (highest
first), the median and the largest relative change |s - s0| / s0 of the weight and input steps, s0
being the initial steps the run started from (rebuilt from the model and calibration: LIMPQ's
statistics init for weights, the calibrated scales for inputs), and the options the outlier rule
forbids. Small drifts mean the indicators are essentially their initialisation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpqflow.artifacts import load_batch_file  # noqa: E402
from mpqflow.config import Config, validate_config  # noqa: E402
from mpqflow.context import load_context  # noqa: E402
from mpqflow.indicators import limpq_forbidden_bits  # noqa: E402
from mpqflow.sensitivity.limpq import indicator_payload, limpq_supernet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--model", default=None, help="a key of models (default: the first)")
    args = ap.parse_args()
    with open(args.config) as f:
        cfg = Config.from_dict(validate_config(yaml.safe_load(f)))
    name = args.model or next(iter(cfg.models))
    res = Path("results") / name
    ctx = load_context(cfg.models[name], cfg.quant, cfg.seed, cfg.runtime, str(res / "model.pt"),
                       str(res / "calibration.pt"))  # fmt: skip
    start = indicator_payload(limpq_supernet(ctx.net, ctx.table, ctx.quantizer, seed=0), ctx.table, samples=0)
    files = sorted((res / "sensitivity" / "limpq").glob("set_*.npz"))
    if not files:
        raise SystemExit(f"no LIMPQ indicator files under {res}/sensitivity/limpq (run the study first)")
    for path in files:
        got = load_batch_file(path)
        for key, bits in (("w_indicator", got["w_bits"]), ("a_indicator", got["a_bits"])):
            rel = np.abs(got[key] - start[key]) / start[key]  # (L, K)
            cols = ", ".join(f"{b} bits {np.median(rel[:, k]):.2%} / {rel[:, k].max():.2%}" for k, b in enumerate(bits))
            print(f"{path.stem} {key[0]} steps, median / max drift: {cols}")
        for key, bits in (("w_indicator", got["w_bits"]), ("a_indicator", got["a_bits"])):
            for l, k in zip(*np.nonzero(limpq_forbidden_bits(got[key]))):
                print(f"{path.stem} outlier: {got['layers'][l]} {key[0]}{bits[k]} (step below the next higher bits')")


if __name__ == "__main__":
    main()
