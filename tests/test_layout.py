"""The package layout: the import-graph code hashes (mpqflow/codehash.py) on a tiny fake package,
then the real package's layering (LAYERS), stage isolation, the levels leaf, module sizes and torch-free
imports."""

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpqflow.codehash import (
    LAYERS,
    code_hash,
    import_graph,
    layer_of,
    layering_violations,
    module_closure,
    module_imports,
)

REPO = Path(__file__).resolve().parent.parent
STAGES = sorted(m.name for m in pkgutil.iter_modules([str(REPO / "mpqflow" / "stages")]))  # every stage module
# A guide for review, not a reason to split a concept or trim a docstring: it flags only the real
# outliers, a module that has grown to hold several things.
MAX_LINES = 600

FAKE = {
    "fakepkg/__init__.py": "",
    "fakepkg/util.py": "X = 1\n",
    "fakepkg/other.py": (
        "thing = 1\n\ndef f():\n    from fakepkg.lazy import g  # runs only when called\n    return g\n"
    ),
    "fakepkg/lazy.py": "import os\nimport fakepkg.deep.mod\n\ndef g():\n    return os.sep\n",
    "fakepkg/deep/__init__.py": "",
    "fakepkg/deep/mod.py": "Y = 2\n",
    "fakepkg/sub/__init__.py": "from .helpers import h\n",
    "fakepkg/sub/helpers.py": "def h():\n    return 0\n",
    "fakepkg/sub/leaf.py": "from .. import util\nfrom ..other import thing\n",
    "fakepkg/stage.py": (
        "from __future__ import annotations\nimport json\nfrom typing import TYPE_CHECKING\n"
        "from fakepkg.sub import leaf, h\n"
        "if TYPE_CHECKING:\n    from fakepkg import typed\n"
    ),
    "fakepkg/typed.py": "",
    "fakepkg/outside.py": "import fakepkg.util\n",
    "fakepkg/broken.py": "from .missing import z\n",
    "fakepkg/ns/mod.py": "",  # a namespace package: no __init__ to run or hash
    "fakepkg/nsuser.py": "from fakepkg.ns import mod\n",
}


@pytest.fixture
def fake(tmp_path):
    for rel, text in FAKE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "module, expected",
    [
        ("fakepkg.sub.leaf", {"fakepkg", "fakepkg.util", "fakepkg.other"}),  # relative, `from .. import mod`
        ("fakepkg.sub", {"fakepkg", "fakepkg.sub.helpers"}),  # relative import in a package __init__
        ("fakepkg.other", {"fakepkg", "fakepkg.lazy"}),  # function-level import
        ("fakepkg.lazy", {"fakepkg", "fakepkg.deep", "fakepkg.deep.mod"}),  # parents of `import a.b.c`
        ("fakepkg.stage", {"fakepkg", "fakepkg.sub", "fakepkg.sub.leaf"}),  # submodule vs name; no TYPE_CHECKING
        ("fakepkg.outside", {"fakepkg", "fakepkg.util"}),
        ("fakepkg.util", set()),
        ("fakepkg.nsuser", {"fakepkg", "fakepkg.ns.mod"}),
        ("fakepkg", set()),
    ],
)
def test_module_imports(fake, module, expected):
    assert module_imports(module, fake) == expected


def test_module_closure_is_transitive_sorted_and_includes_parent_packages(fake):
    assert module_closure("fakepkg.stage", fake) == [
        "fakepkg",
        "fakepkg.deep",
        "fakepkg.deep.mod",
        "fakepkg.lazy",
        "fakepkg.other",
        "fakepkg.stage",
        "fakepkg.sub",
        "fakepkg.sub.helpers",
        "fakepkg.sub.leaf",
        "fakepkg.util",
    ]
    assert module_closure("fakepkg.deep.mod", fake) == ["fakepkg", "fakepkg.deep", "fakepkg.deep.mod"]
    assert module_closure("fakepkg.ns.mod", fake) == ["fakepkg", "fakepkg.ns.mod"]


def test_missing_modules_raise(fake):
    with pytest.raises(ModuleNotFoundError, match="fakepkg.missing.*fakepkg.broken"):
        module_closure("fakepkg.broken", fake)
    with pytest.raises(ModuleNotFoundError):
        code_hash("fakepkg.nothere", root=fake)


@pytest.mark.parametrize(
    "edited, changes",
    [
        ("fakepkg/stage.py", True),
        ("fakepkg/sub/__init__.py", True),  # a package __init__ runs on import
        ("fakepkg/sub/helpers.py", True),  # imported by that __init__
        ("fakepkg/lazy.py", True),  # reached through a function-level import
        ("fakepkg/deep/mod.py", True),
        ("fakepkg/outside.py", False),
        ("fakepkg/typed.py", False),  # only imported for type checking
        ("fakepkg/broken.py", False),
    ],
)
def test_code_hash_changes_with_the_closure_only(fake, edited, changes):
    before = code_hash("fakepkg.stage", root=fake)
    assert re.fullmatch(r"[0-9a-f]{16}", before)
    assert code_hash("fakepkg.stage", root=fake) == before
    with open(fake / edited, "a") as f:
        f.write("# edited\n")
    assert (code_hash("fakepkg.stage", root=fake) != before) == changes


def test_code_hash_of_several_modules_is_that_of_their_union(fake):
    assert code_hash("fakepkg.sub.leaf", "fakepkg.stage", root=fake) == code_hash("fakepkg.stage", root=fake)
    assert code_hash("fakepkg.outside", "fakepkg.stage", root=fake) != code_hash("fakepkg.stage", root=fake)


def test_import_graph_of_the_fake_package(fake):
    graph = import_graph(fake, package="fakepkg")
    assert set(graph) == {rel[:-3].replace("/", ".").removesuffix(".__init__") for rel in FAKE}
    assert graph["fakepkg.other"] == {"fakepkg", "fakepkg.lazy"}
    assert graph["fakepkg.broken"] == {"fakepkg", "fakepkg.missing"}


def test_layering_checker_on_a_made_up_graph():
    graph = {
        "mpqflow": set(),
        "mpqflow.io": set(),
        "mpqflow.stages": {"mpqflow.stages.solve"},
        "mpqflow.quant": {"mpqflow.io"},
        "mpqflow.quant.levels": {"mpqflow.quant", "mpqflow.methods"},
        "mpqflow.methods": {"mpqflow.quant.levels"},
        "mpqflow.helpers": set(),
        "mpqflow.stages.solve": {"mpqflow.stages", "mpqflow.methods", "mpqflow.gone"},
        "mpqflow.stages.study": {"mpqflow.stages.solve"},
    }
    assert [layer_of(m) for m in ("mpqflow", "mpqflow.quant", "mpqflow.quant.x", "mpqflow.quantx")] == [0, 1, 1, None]
    assert layering_violations(graph) == [
        "mpqflow.helpers: in no layer (add it to LAYERS in mpqflow/codehash.py)",
        "mpqflow.quant.levels -> mpqflow.methods: core (layer 1) imports model-aware (layer 2)",
        "mpqflow.stages -> mpqflow.stages.solve: a stage imports another stage",
        "mpqflow.stages.solve -> mpqflow.gone: no such module",
        "mpqflow.stages.study -> mpqflow.stages.solve: a stage imports another stage",
    ]


# ---- the real package (these fail until the move to mpqflow/stages/ is done) ----


def test_real_package_follows_the_layering():
    violations = layering_violations(import_graph(REPO))
    layers = "\n".join(f"  {i} {name}: {', '.join(p)}" for i, (name, p) in enumerate(LAYERS))
    assert not violations, "\n".join(violations) + f"\nlayers (lowest first):\n{layers}"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_runs_no_other_stage(stage):
    module = f"mpqflow.stages.{stage}"
    closure = module_closure(module, REPO)  # raises if the stage module or one of its imports is missing
    assert [m for m in closure if m.startswith("mpqflow.stages.")] == [module]


def test_every_stage_is_the_code_of_a_rule_and_every_rule_code_a_stage():
    """STAGES is every module of mpqflow/stages/; the rules' stage_code(...) params name exactly those."""
    assert {"train", "solve", "study", "gradquant_report"} <= set(STAGES)
    used = set()
    for path in (REPO / "rules").glob("*.smk"):
        used |= set(re.findall(r"stage_code\(\"(\w+)\"\)", path.read_text()))
    assert used == set(STAGES)


def test_levels_are_a_leaf_that_training_reaches_without_the_quantizers():
    """The ALQ/AMQ levels (mpqflow.levels) import nothing else from mpqflow; the quantizers and the
    gradient exchange both import them, and the exchange and the training stages import no quantizer
    code, so editing the quantizers does not retrain."""
    graph = import_graph(REPO)
    levels = [m for m in graph if m == "mpqflow.levels" or m.startswith("mpqflow.levels.")]
    assert levels and all(d == "mpqflow" or d.startswith("mpqflow.levels") for m in levels for d in graph[m])
    assert "mpqflow.levels.fit" in module_closure("mpqflow.quant", REPO)
    assert "mpqflow.levels.fit" in module_closure("mpqflow.comm", REPO)
    for module in ("mpqflow.comm", "mpqflow.stages.train", "mpqflow.stages.gradquant"):
        closure = module_closure(module, REPO)
        assert not [m for m in closure if m == "mpqflow.quant" or m.startswith("mpqflow.quant.")], module


def test_no_module_is_too_long():
    lengths = {
        p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in (REPO / "mpqflow").rglob("*.py")
    }
    assert not {p: n for p, n in lengths.items() if n > MAX_LINES}, f"modules over {MAX_LINES} lines"


def _workflow_imports():
    """The mpqflow modules the Snakefile and rules/*.smk import themselves (at every DAG build)."""
    found = set()
    for path in [REPO / "Snakefile", *(REPO / "rules").glob("*.smk")]:
        found |= set(re.findall(r"^\s*(?:from|import)\s+(mpqflow(?:\.\w+)*)", path.read_text(), re.MULTILINE))
    return found


@pytest.mark.parametrize(
    "module",
    sorted(
        {
            "mpqflow.stages.solve",
            "mpqflow.stages.study",
            "mpqflow.stages.uniform_report",
            "mpqflow.stages.ptq_report",
            "mpqflow.stages.finetune_report",
            "mpqflow.stages.gradquant_report",
            "mpqflow.config",
            "mpqflow.names",
            "mpqflow.data",
            "mpqflow.methods",
            "mpqflow.codehash",
            *_workflow_imports(),
        }
    ),
)
def test_imports_no_torch(module):
    banned = "torch" if module != "mpqflow.codehash" else "torch, numpy"
    code = f"import {module}, sys; bad = [m for m in ({banned!r}).split(', ') if m in sys.modules]; assert not bad, bad"
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"importing {module} failed or loaded {banned}:\n{proc.stderr[-2000:]}"
