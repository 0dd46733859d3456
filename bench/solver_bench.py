"""Solver benchmark: solve time, status, objective and gap per back-end on real and ResNet-50-sized problems.

Usage:
    .venv/bin/python bench/solver_bench.py                          # uses results/digits_resnet20/
    .venv/bin/python bench/solver_bench.py --results /tmp/run/results/digits_resnet20 --time-limit 60
    .venv/bin/python bench/solver_bench.py --no-synthetic --methods clado_raw --backends highs gurobi \
        --sets set_1x0 set_1x1 set_4x0 set_4x1 --node-limit highs=50 gurobi=100000 scip=2000 --mip-gap 1e-4
    .venv/bin/python bench/solver_bench.py --scaling --backends auto --time-limit 60

Instances:
    1. the default model's CLADO cross-entropy matrix (sensitivity/clado/set_4x0.npz, else set_1x0,
       or --sets), raw (clado_raw) and PSD-projected (clado), at several budgets (--budgets);
    2. synthetic ResNet-50-sized instances, 54 layers x 3 options (W{2,4,8}A8) and x 6 options
       (A{4,8}xW{2,4,8}), raw and PSD: torchvision ResNet-50's 54 Conv/Linear layers with their real
       weight counts and MACs; every G block (layer p, layer q) is a block of the real matrix
       (random real layer pair, diagonal blocks from real diagonal blocks), seeded.
    3. with --scaling: the same construction on ResNet-50's first 12, 18, ..., 54 layers, to show how
       the proof time of one back-end (the first of --backends) grows with the number of layers.
Each line ends with the decision (option index per layer). Exact back-ends must agree where they
prove optimality; a `disagree` line flags different proven objectives, a `differ` line different
decisions.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpqflow.artifacts import load_batch_file, load_layer_table  # noqa: E402
from mpqflow.layers import LayerTable  # noqa: E402
from mpqflow.methods import method_objective, psd_project  # noqa: E402
from mpqflow.optimize import (  # noqa: E402
    BACKENDS,
    BackendUnavailable,
    Problem,
    build_problem,  # noqa: E402
    solve,
)


def _layer_table(results: Path) -> LayerTable:
    """The results directory's layer table: layers.json, or the table inside calibration.pt of a
    results directory written before layers.json existed."""
    if (results / "layers.json").exists():
        return load_layer_table(results / "layers.json")
    from mpqflow.checkpoints import torch_load

    return LayerTable.from_dict(torch_load(results / "calibration.pt", "calibration")["table"])


def real_problem(results: Path, method: str, set_name: str | None = None):
    """The default model's Problem for `method` (clado: PSD, clado_raw: raw) on a pooled CLADO set
    (default: the largest set_*x0), its layer table and the set's file name."""
    sets = sorted((results / "sensitivity" / "clado").glob("set_*x0.npz"), reverse=True)
    if set_name is not None:
        sets = [results / "sensitivity" / "clado" / f"{set_name}.npz"]
    if not sets or not sets[0].exists():
        raise SystemExit(
            f"no CLADO set {set_name or 'set_*x0'} under {results}/sensitivity/clado: run `snakemake --cores 2` first"
        )
    table = _layer_table(results)
    G, linear = method_objective(method, load_batch_file(sets[0]), table)
    return build_problem(table, G, linear), table, sets[0].name


def real_raw_G(results: Path, table) -> np.ndarray:
    """The default model's raw CLADO matrix (largest set) that the synthetic instances copy blocks from."""
    batch = sorted((results / "sensitivity" / "clado").glob("set_*x0.npz"))[-1]
    return build_problem(table, method_objective("clado_raw", load_batch_file(batch), table)[0], None).G


@functools.lru_cache(maxsize=1)
def resnet50_costs():
    """(numel, macs) of torchvision ResNet-50's 54 Conv/Linear layers at 224x224."""
    import torch
    import torchvision

    from mpqflow.models import layer_macs, quantizable_layers

    net = torchvision.models.resnet50(weights=None)
    x = torch.zeros(1, 3, 224, 224)
    names, macs = quantizable_layers(net, x), layer_macs(net, x)
    mods = dict(net.named_modules())
    return np.array([mods[n].weight.numel() for n in names], float), np.array([macs[n] for n in names], float)


def synthetic_problem(
    real_G: np.ndarray, real_opts, K: int, raw: bool, seed: int = 0, layers: int | None = None
) -> Problem:
    """ResNet-50's first `layers` layers (default all 54) x K options, G blocks copied from the real
    matrix, ResNet-50 costs."""
    rng = np.random.default_rng(seed)
    k_real = len(real_opts)
    keep = [i for i, (w, a) in enumerate(real_opts) if K == k_real or a == 8][:K]
    opts = [real_opts[i] for i in keep]
    L_real = real_G.shape[0] // k_real
    numel, macs = resnet50_costs()
    numel, macs = numel[:layers], macs[:layers]
    L = len(numel)
    block = lambda p, q: real_G[np.ix_([p * k_real + i for i in keep], [q * k_real + i for i in keep])]  # noqa: E731
    G = np.zeros((L * K, L * K))
    for p in range(L):
        G[p * K : (p + 1) * K, p * K : (p + 1) * K] = block(*(2 * [int(rng.integers(L_real))]))
        for q in range(p + 1, L):
            a, b = rng.choice(L_real, 2, replace=False)
            G[p * K : (p + 1) * K, q * K : (q + 1) * K] = block(a, b)
            G[q * K : (q + 1) * K, p * K : (p + 1) * K] = block(a, b).T
    G = G if raw else psd_project(G)
    layer_of = np.repeat(np.arange(L), K)
    return Problem(
        G=G,
        layer_of=layer_of,
        layer_names=[f"layer{l}" for l in range(L)],
        options=opts * L,
        size_bits=np.array([numel[l] * w for l, (w, _) in zip(layer_of, opts * L)]),
        bitops=np.array([macs[l] * w * a for l, (w, a) in zip(layer_of, opts * L)]),
    )


def _choice(problem: Problem, sol) -> str:
    """The decision as one option index (within its layer) per layer, e.g. '0431...'."""
    return "".join(str(int(i - problem.layers[l][0])) for l, i in enumerate(sol.choice))


def run(
    name: str, problem: Problem, budgets, backends, time_limit: float, mip_gap: float = 1e-6, node_limit=None
) -> None:
    for budget in budgets:
        found = {}
        for backend in backends:
            try:
                sol = solve(
                    problem, budget, backend=backend, time_limit=time_limit, mip_gap=mip_gap, node_limit=node_limit
                )
            except BackendUnavailable as err:  # gurobi's size-limited licence
                print(f"{name:28s} {budget:14s} {backend:7s} refused: {str(err)[:90]}")
                continue
            found[backend] = sol
            print(
                f"{name:28s} {budget:14s} {backend:7s} {sol.seconds:8.2f} s  {sol.status:10s} "
                f"objective {sol.objective: .6g}  gap {sol.gap:.2e}  {_choice(problem, sol)}",
                flush=True,
            )
        proven = [s.objective for s in found.values() if s.status == "optimal"]
        if proven and max(proven) - min(proven) > 1e-6 * max(1.0, abs(min(proven))):
            print(f"{name:28s} {budget:14s} disagree: {proven}")
        if len({_choice(problem, s) for s in found.values()}) > 1:
            print(f"{name:28s} {budget:14s} differ: " + ", ".join(f"{b} {s.objective:.9g}" for b, s in found.items()))


def scaling(raw_G: np.ndarray, real_opts, backend: str, time_limit: float, budget: str) -> None:
    """Proof time against problem size: the synthetic construction on ResNet-50's first L layers,
    L growing until the back-end no longer proves the optimum within the time limit (or refuses)."""
    for K in (3, 6):
        for raw in (False, True):
            for L in (12, 18, 24, 30, 33, 36, 42, 48, 54):
                problem = synthetic_problem(raw_G, real_opts, K, raw, layers=L)
                name = f"scaling {L}x{K} {'raw' if raw else 'psd'}"
                try:
                    sol = solve(problem, budget, backend=backend, time_limit=time_limit, mip_gap=1e-6)
                except BackendUnavailable as err:  # gurobi's size-limited licence
                    print(f"{name:28s} {budget:14s} {backend:7s} refused: {str(err)[:90]}", flush=True)
                    break
                print(
                    f"{name:28s} {budget:14s} {sol.backend:7s} {sol.seconds:8.2f} s  {sol.status:10s} "
                    f"objective {sol.objective: .6g}  gap {sol.gap:.2e}",
                    flush=True,
                )
                if sol.status != "optimal":
                    break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("results/digits_resnet20"))
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="only the proof time of the first back-end against the number of layers (12..54)",
    )
    ap.add_argument("--budget", default="avg_bits-4", help="the budget of --scaling")
    ap.add_argument("--methods", nargs="+", default=["clado_raw", "clado"], help="real instances' methods")
    ap.add_argument("--sets", nargs="+", default=[None], help="real instances' CLADO sets (default: largest x0)")
    ap.add_argument(
        "--budgets",
        nargs="+",
        help="real instances' budgets",
        default=["avg_bits-2.5", "avg_bits-3", "avg_bits-4", "avg_bits-5", "bitops_rel-0.25"],
    )
    ap.add_argument("--mip-gap", type=float, default=1e-6)
    ap.add_argument(
        "--node-limit",
        nargs="+",
        default=None,
        metavar="[BACKEND=]NODES",
        help="one node limit, or one per back-end as highs=50 gurobi=100000 scip=2000 (default: none)",
    )
    args = ap.parse_args()
    nodes = (
        None
        if args.node_limit is None
        else int(args.node_limit[0])
        if len(args.node_limit) == 1 and "=" not in args.node_limit[0]
        else {k: int(v) for k, v in (a.split("=") for a in args.node_limit)}
    )
    if args.scaling:
        table = real_problem(args.results, "clado_raw")[1]
        scaling(real_raw_G(args.results, table), list(table.options), args.backends[0], args.time_limit, args.budget)
        return
    for method in args.methods:
        for set_name in args.sets:
            problem, table, set_file = real_problem(args.results, method, set_name)
            run(
                f"{method} {set_file} {problem.L}x{len(table.options)}",
                problem,
                args.budgets,
                args.backends,
                args.time_limit,
                args.mip_gap,
                nodes,
            )
    if args.no_synthetic:
        return
    raw_G = real_raw_G(args.results, table)
    for K in (3, 6):
        for raw in (False, True):
            t0 = time.perf_counter()
            problem = synthetic_problem(raw_G, list(table.options), K, raw)
            name = f"resnet50-like 54x{K} {'raw' if raw else 'psd'}"
            print(
                f"{name}: built in {time.perf_counter() - t0:.1f} s, "
                f"{int((np.linalg.eigvalsh(problem.G) < -1e-12).sum())} negative eigenvalues",
                flush=True,
            )
            run(
                name,
                problem,
                ["avg_bits-3", "avg_bits-4", "avg_bits-5"],
                args.backends,
                args.time_limit,
                args.mip_gap,
                nodes,
            )


if __name__ == "__main__":
    main()
