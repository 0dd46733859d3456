"""Do two result trees of one model agree? Every decision, evaluation, sanity and PTQ JSON, and the
study's tables, compared with their timings left out (they differ from run to run by nature).

    python scripts/compare_results.py before/results/digits_resnet20 after/results/digits_resnet20

Prints one line per artifact kind and every difference; exits 1 when anything but a timing differs
(or a file is missing on one side), 0 when the two trees agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

TIMING = ("seconds", "time")  # keys and columns holding durations (solver_seconds, train_seconds, time_limit)
JSON_DIRS = ("decisions", "eval", "finetuned", "sanity", "ptq")
TABLES = ("study.csv", "sanity.csv", "calibration.csv", "pareto_auc.csv", "eval/uniform.csv", "ptq.csv",
          "finetune.csv")  # fmt: skip


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def compare_json(a: Path, b: Path, sub: str) -> list[str]:
    """Differences between the JSON files under `sub` of both trees (names, then contents)."""
    names_a = {p.relative_to(a) for p in (a / sub).rglob("*.json")}
    names_b = {p.relative_to(b) for p in (b / sub).rglob("*.json")}
    out = [f"{rel}: only in {a}" for rel in sorted(names_a - names_b)]
    out += [f"{rel}: only in {b}" for rel in sorted(names_b - names_a)]
    for rel in sorted(names_a & names_b):
        x, y = (_without_timings(json.loads((root / rel).read_text())) for root in (a, b))
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k)) if isinstance(x, dict) else ["(list)"]
            out.append(f"{rel}: {', '.join(map(str, keys))} differ")
    return out


def compare_table(a: Path, b: Path, name: str) -> list[str]:
    """Differences between one CSV table of both trees, timing columns left out."""
    if not (a / name).exists() and not (b / name).exists():
        return []
    if not (a / name).exists() or not (b / name).exists():
        return [f"{name}: only in {b if not (a / name).exists() else a}"]
    x, y = pd.read_csv(a / name), pd.read_csv(b / name)
    if list(x.columns) != list(y.columns) or len(x) != len(y):
        return [f"{name}: columns or row count differ ({list(x.columns)} x {len(x)} vs {list(y.columns)} x {len(y)})"]
    cols = [c for c in x.columns if not any(t in c for t in TIMING)]
    return [f"{name}: column {c} differs" for c in cols if not x[c].equals(y[c])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="one results/<model> directory")
    parser.add_argument("b", type=Path, help="the other")
    args = parser.parse_args(argv)
    differences = []
    for sub in JSON_DIRS:
        found = compare_json(args.a, args.b, sub)
        count = len(list((args.a / sub).rglob("*.json")))
        print(f"{sub}/: {count} JSON files, {len(found)} differences")
        differences += found
    for name in TABLES:
        found = compare_table(args.a, args.b, name)
        print(f"{name}: {'identical but timings' if not found else f'{len(found)} differences'}")
        differences += found
    for line in differences:
        print("  " + line)
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
