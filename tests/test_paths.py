"""One owner of the result paths (mpqflow/paths.py), and set identity recorded in the set files."""

import re
from pathlib import Path

import numpy as np
import pytest

from mpqflow import paths
from mpqflow.artifacts import SET_FIELDS, load_batch_file, save_batch_file, set_identity

REPO = Path(__file__).resolve().parent.parent


def test_rules_name_no_result_path_of_their_own():
    """Every results/ path in the rules comes from mpqflow.paths (logs mirror them, but are no results)."""
    literal = re.compile(r"""["']results/""")
    found = [
        f"{f.name}:{i}: {line.strip()}"
        for f in sorted((REPO / "rules").glob("*.smk"))
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert found == [], "result paths outside mpqflow/paths.py:\n" + "\n".join(found)


def test_library_builds_no_result_path():
    """The library gets its paths from the rules; none of its modules but paths.py spells one out in code
    (docstrings' usage lines excepted)."""
    found = []
    for f in sorted((REPO / "mpqflow").rglob("*.py")):
        if f.name == "paths.py":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"""f?["']results/\{""", code) and not line.lstrip().startswith(("Usage", ">>>")):
                found.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert found == [], "\n".join(found)


def test_patterns_fill_with_the_rules_wildcards():
    assert paths.DECISION.format(model="m", method="clado", n=4, s=0, budget="avg_bits-2.5") == (
        "results/m/decisions/clado/set_4x0/avg_bits-2.5.json"
    )
    assert paths.set_file("m", "hawq", 2, 1) == "results/m/sensitivity/hawq/set_2x1.npz"
    assert paths.LIMPQ_SET.format(model="m", n=2, s=1) == paths.set_file("m", "limpq", 2, 1)
    name = paths.target_name("clado", 4, 0, "avg_bits-2.5")
    assert paths.TARGET_DECISION.format(model="m", target=name) == paths.DECISION.format(
        model="m", method="clado", n=4, s=0, budget="avg_bits-2.5"
    )
    assert paths.plot("ptq") == "results/{model}/plots/ptq.png"
    assert paths.uniform_target("w2a4") == "uniform/w2a4"


def _file(tmp_path, name, **identity):
    payload = {"sq_sum": np.ones(4), "count": np.int64(3), **identity}
    meta = {"format": 3, "estimator": "mpqco", "layers": ["a"], "options": np.array([[8, 8], [4, 8], [2, 8], [2, 4]]),
            "quant": "{}", "checkpoint_sha256": "x", "settings": "{}"}  # fmt: skip
    path = tmp_path / name
    save_batch_file(path, payload, meta)
    return path


def test_a_set_file_records_its_identity_and_a_name_does_not_make_one(tmp_path):
    """The identity comes from the file, whatever it is called; a file without one is refused by name."""
    path = _file(tmp_path, "anything.npz", set_size=4, set_id=2)
    data = load_batch_file(path)
    assert set_identity(data, path) == (4, 2)
    assert {k: data[k] for k in SET_FIELDS} == {"set_size": 4, "set_id": 2}
    bare = _file(tmp_path, "set_4x2.npz")
    with pytest.raises(ValueError, match=r"set_4x2\.npz: not a sensitivity set file .*recompute"):
        set_identity(load_batch_file(bare), bare)
