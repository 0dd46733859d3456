"""LIMPQ's ResNet-50 search through the project's solver: policy, compression ratio, average bits, time.

Usage:
    .venv/bin/python bench/limpq_search_bench.py                                  # synthetic indicators
    .venv/bin/python bench/limpq_search_bench.py --indicators importance_indicators_resnet50.pkl
    .venv/bin/python bench/limpq_search_bench.py --indicators ... --limpq-bitops   # LIMPQ's own MAC count

The instance is LIMPQ's headline search: torchvision ResNet-50 geometry (no weights: a 224x224
forward only measures MACs), conv1 and fc fixed at W8A8, bit-widths {6,5,4,3,2} for weights and
activations (25 options per layer, 52 layers), alpha = 2, BitOPs <= the model with every searched
layer at W3A4 (the fixed layers' BitOPs on both sides), and compression ratio 12.2 against FP32.
`--indicators` reads a LIMPQ-format pickle (e.g. the released ResNet-50 file of github.com/1hunters/
LIMPQ, quantization_search/indicators/) by layer name; without it, seeded synthetic indicators that
grow as the bit-width falls stand in. With the released file the policy is compared layer by layer
with LIMPQ's published W3A4 / 12.2x policy (its fine-tuning config). `--limpq-bitops` counts MACs
as LIMPQ's search script does (unfloored output sizes) to show the published policy is the optimum of
that count; the default counts the MACs the layers really compute.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpqflow.config import QuantConfig  # noqa: E402
from mpqflow.context import layer_table  # noqa: E402
from mpqflow.indicators import bit_lists, limpq_allowed, limpq_linear, read_limpq_pickle  # noqa: E402
from mpqflow.models import build_model  # noqa: E402
from mpqflow.optimize import (  # noqa: E402
    BackendUnavailable,
    Budget,
    build_problem,  # noqa: E402
    solve,
)

BITS = [6, 5, 4, 3, 2]
# LIMPQ's published ResNet-50 policy at W3A4-level BitOPs and 12.2x compression (searched layers in order)
PUBLISHED_W = [6, 3, 4, 5, 4, 4, 5, 4, 4, 5, 4, 3, 4, 3, 3, 3, 4, 4, 3, 4, 4, 3, 4, 3, 2, 3]
PUBLISHED_W += [2, 3, 2, 3, 3, 2, 2, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
PUBLISHED_A = [6, 4, 6, 6, 6, 3, 4, 6, 3, 4, 5, 3, 5, 5, 6, 3, 4, 5, 3, 4, 5, 3, 4, 4, 4, 6]
PUBLISHED_A += [5, 5, 4, 5, 5, 4, 6, 5, 3, 5, 6, 3, 5, 6, 3, 6, 4, 4, 6, 2, 6, 4, 6, 6, 4, 6]


def resnet50_table(limpq_bitops: bool):
    net = build_model("torchvision:resnet50", num_classes=1000)
    quant = QuantConfig.from_dict(
        {"weight": {}, "activation": {}, "w_bits": BITS, "a_bits": BITS, "fixed_bits": 8, "fix_first_last": True,
         "calibration_samples": 64, "calibration_batch_size": 64}
    )  # fmt: skip
    table = layer_table(net, torch.zeros(1, 3, 224, 224), quant)
    if limpq_bitops:
        table.macs.update(unfloored_macs(net))
    return table


def unfloored_macs(net) -> dict:
    """MACs with the output size as ((H + 2p - d(k-1) - 1)/s + 1) * (...) in floats, truncated once."""
    macs = {}

    def hook(m, args, name):
        h, w = args[0].shape[2:]
        size = ((h + 2 * m.padding[0] - m.dilation[0] * (m.kernel_size[0] - 1) - 1) / m.stride[0] + 1) * (
            (w + 2 * m.padding[1] - m.dilation[1] * (m.kernel_size[1] - 1) - 1) / m.stride[1] + 1
        )
        macs[name] = m.in_channels * m.out_channels * int(size) * m.kernel_size[0] * m.kernel_size[1] // m.groups

    handles = [
        m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n))
        for n, m in net.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, 224, 224))
    for h in handles:
        h.remove()
    return macs


def synthetic_indicators(table, seed: int = 0) -> dict:
    """Steps that grow as bits fall (LIMPQ's shape), one random scale per layer, 5% noise (a few outliers)."""
    rng = np.random.default_rng(seed)
    w_bits, a_bits = bit_lists(table)
    L = len(table.candidates)

    def part(bits, base):
        scale = base * rng.lognormal(0, 0.5, (L, 1))
        return scale * 2.0 ** (-np.asarray(bits, float))[None, :] * rng.lognormal(0, 0.05, (L, len(bits)))

    return {"w_indicator": part(w_bits, 1.0), "a_indicator": part(a_bits, 4.0), "w_bits": np.array(w_bits),
            "a_bits": np.array(a_bits), "count": np.int64(0)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--indicators", help="LIMPQ-format pickle (default: synthetic indicators)")
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--cr", type=float, default=12.2)
    ap.add_argument("--bitops-option", default="3,4", help="w,a of the uniform model whose BitOPs are the cap")
    ap.add_argument("--backends", nargs="+", default=["highs", "scip", "gurobi"])
    ap.add_argument("--limpq-bitops", action="store_true", help="count MACs with LIMPQ's unfloored output sizes")
    args = ap.parse_args()

    table = resnet50_table(args.limpq_bitops)
    payload = read_limpq_pickle(args.indicators, table) if args.indicators else synthetic_indicators(table)
    allowed = limpq_allowed(payload, table)
    problem = build_problem(table, linear=limpq_linear(payload, table, args.alpha), allowed=allowed)
    w, a = (int(v) for v in args.bitops_option.split(","))
    cap_bitops = table.bitops(table.uniform_assignment((w, a)))
    budgets = [Budget("gbitops", cap_bitops / 1e9), Budget("cr", args.cr)]
    print(
        f"ResNet-50, {problem.L} searched layers x {len(table.options)} options ({int((~allowed).sum())} forbidden "
        f"by the outlier rule), alpha {args.alpha}; caps: BitOPs of all-W{w}A{a} = {cap_bitops / 1e9:.4f} G "
        f"({'LIMPQ unfloored' if args.limpq_bitops else 'floored'} MACs), cr {args.cr}"
    )
    fp32_bits = 32 * problem.total_numel
    if args.indicators:
        published = table.full_assignment(dict(zip(table.candidates, zip(PUBLISHED_W, PUBLISHED_A))))
        ops, cr = table.bitops(published), fp32_bits / table.weight_bits(published)
        print(
            f"LIMPQ's published policy: GBitOPs {ops / 1e9:.4f} ({ops / cap_bitops - 1:+.2%} vs the cap), cr {cr:.3f}"
        )
    for backend in args.backends:
        t0 = time.perf_counter()
        try:
            sol = solve(problem, budgets, backend=backend, time_limit=120)
        except BackendUnavailable as err:
            print(f"{backend:7s} unavailable: {err}")
            continue
        wall = time.perf_counter() - t0
        opts = [problem.options[i] for i in sol.choice]
        wb, ab = [o[0] for o in opts], [o[1] for o in opts]
        size = problem.total_size_bits(sol.x)
        print(
            f"{backend:7s} {sol.status:9s} solve {sol.seconds:.3f} s (wall {wall:.3f} s)  "
            f"objective {sol.objective:.6f}  cr {fp32_bits / size:.3f}  size {size / 8 / 2**20:.3f} MiB  "
            f"GBitOPs {problem.total_bitops(sol.x) / 1e9:.4f}  avg w {np.mean(wb):.3f}  avg a {np.mean(ab):.3f} "
            f"(unweighted, as LIMPQ prints; weight-weighted avg w {problem.avg_bits(sol.x):.3f})"
        )
        print(f"        weight bits {wb}\n        act bits    {ab}")
        if args.indicators:
            same_w = sum(x == y for x, y in zip(wb, PUBLISHED_W))
            same_a = sum(x == y for x, y in zip(ab, PUBLISHED_A))
            n = len(wb)
            print(f"        vs LIMPQ's published policy: {same_w}/{n} weight, {same_a}/{n} activation bits equal")


if __name__ == "__main__":
    main()
