"""scripts/compare_results.py: two result trees agree when only timings differ, and not otherwise."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compare_results.py"


def _tree(root: Path, choice: str, seconds: float, top1: float) -> Path:
    d = root / "decisions" / "clado" / "set_1x0"
    d.mkdir(parents=True)
    decision = {"choice": [choice], "solver": {"status": "optimal", "seconds": seconds}}
    (d / "avg_bits-4.json").write_text(json.dumps(decision))
    (root / "study.csv").write_text(f"method,top1,solver_seconds\nclado,{top1},{seconds}\n")
    return root


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True, timeout=60)


def test_trees_differing_in_timings_only_agree(tmp_path):
    proc = _compare(_tree(tmp_path / "a", "w4a8", 0.1, 0.9), _tree(tmp_path / "b", "w4a8", 7.0, 0.9))
    assert proc.returncode == 0, proc.stdout
    assert (
        "decisions/: 1 JSON files, 0 differences" in proc.stdout and "study.csv: identical but timings" in proc.stdout
    )


def test_a_changed_choice_or_accuracy_is_reported(tmp_path):
    proc = _compare(_tree(tmp_path / "a", "w4a8", 0.1, 0.9), _tree(tmp_path / "b", "w2a8", 0.1, 0.8))
    assert proc.returncode == 1
    assert "avg_bits-4.json: choice differ" in proc.stdout and "study.csv: column top1 differs" in proc.stdout
    (tmp_path / "b" / "decisions" / "clado" / "set_1x0" / "avg_bits-4.json").unlink()
    assert "only in" in _compare(tmp_path / "a", tmp_path / "b").stdout
