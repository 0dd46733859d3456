"""How far the strongest cheap relaxation sits below the optimum: the Shor SDP bound of a synthetic
ResNet-50-sized instance next to the best decision `solve` finds (proven optimal where it says so).

Usage:
    .venv/bin/python bench/relaxation_bound.py --results /tmp/run/results/digits_resnet20
    .venv/bin/python bench/relaxation_bound.py --results ... --instance 54x3-raw --budget avg_bits-4

The relaxation (cvxpy + SCS): Y = [[1, xᵀ], [x, X]] ⪰ 0, diag(X) = x, X = 0 between two options of
one layer, one option per layer, the budget and its products with every x_a (RLT), minimizing ⟨G, X⟩.
On one-hot x it is exact, so its optimum bounds the integer optimum from below; a wide gap means
any branch and bound built on it (QCR and the like) must still branch a lot. SCS is a first-order
solver: the bound is accurate to about its tolerance, not certified.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from solver_bench import real_problem, real_raw_G, synthetic_problem  # noqa: E402

from mpqflow.optimize import caps_of, solve  # noqa: E402


def shor_bound(problem, budget: str) -> float:
    """The SDP relaxation's optimum (size caps only: the synthetic budgets are average bits)."""
    import cvxpy as cp

    size_cap = caps_of(budget, problem).size_bits
    n, lo = problem.n, problem.layer_of
    same = lo[:, None] == lo[None, :]
    G = np.where(same, 0.0, problem.G) + np.diag(np.diag(problem.G))  # within-layer entries vanish
    Y = cp.Variable((n + 1, n + 1), symmetric=True)
    x, X = Y[0, 1:], Y[1:, 1:]
    off = np.argwhere(np.triu(same, 1))
    cap = size_cap - problem.fixed_size_bits
    cons = [
        Y >> 0,
        Y[0, 0] == 1,
        cp.diag(X) == x,
        X[off[:, 0], off[:, 1]] == 0,
        problem.size_bits @ x <= cap,
        cap * x - X @ problem.size_bits >= 0,
    ]
    cons += [cp.sum(x[ix]) == 1 for ix in problem.layers]
    prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(G, X))), cons)
    prob.solve(solver="SCS", eps_abs=1e-6, eps_rel=1e-6, max_iters=20000)
    return float(prob.value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("results/digits_resnet20"))
    ap.add_argument(
        "--instance",
        nargs="+",
        default=["54x3-psd", "54x3-raw"],
        help="synthetic instances, LxK-psd or LxK-raw (K: 3 or 6)",
    )
    ap.add_argument("--budget", nargs="+", default=["avg_bits-4", "avg_bits-5"])
    ap.add_argument("--time-limit", type=float, default=60.0, help="of the solve beside the bound")
    args = ap.parse_args()
    table = real_problem(args.results, "clado_raw")[1]
    raw_G = real_raw_G(args.results, table)
    for name in args.instance:
        shape, form = name.split("-")
        L, K = (int(v) for v in shape.split("x"))
        problem = synthetic_problem(raw_G, list(table.options), K, form == "raw", layers=L)
        for budget in args.budget:
            sol = solve(problem, budget, backend="auto", time_limit=args.time_limit, mip_gap=1e-6)
            t0 = time.perf_counter()
            bound = shor_bound(problem, budget)
            print(
                f"{name:10s} {budget:12s} decision {sol.objective: .6g} ({sol.status}, {sol.backend}, "
                f"{sol.seconds:.1f} s)  SDP bound {bound: .6g} ({time.perf_counter() - t0:.1f} s)  "
                f"gap {(sol.objective - bound) / abs(sol.objective):.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
