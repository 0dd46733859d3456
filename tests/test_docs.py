"""The documentation: the generated configuration page is current and complete, the README is the
short entry point with the CI command, mkdocs' nav matches docs/, and the site builds strictly.

    python -m pytest -q tests/test_docs.py
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGE = DOCS / "configuration.md"
MAX_README_LINES = 160
RUN_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && snakemake --cores 2"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _schema():
    return yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())


def _resolve(node, root):
    while "$ref" in node:
        target = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _schema_keys(node, root, key):
    """Every dotted key at or below `key`, found independently of the generator."""
    node = _resolve(node, root)
    keys = {key}
    for name, sub in node.get("properties", {}).items():
        keys |= _schema_keys(sub, root, f"{key}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        keys |= _schema_keys(node["additionalProperties"], root, f"{key}.<name>")
    if isinstance(node.get("items"), dict):
        keys |= _schema_keys(node["items"], root, f"{key}[]") - {f"{key}[]"}
    for alt in node.get("oneOf", []) + node.get("anyOf", []):
        keys |= _schema_keys(alt, root, key)
    return keys


def _bash_blocks(text):
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def _ci_commands():
    """The command lines of .ci/run (comments and shell set-up left out)."""
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [
        line.strip()
        for line in lines
        if line.strip() and not line.startswith("#") and not re.match(r"(set|cd|export) ", line.strip())
    ]


def test_configuration_page_is_current():
    expected = _generator().render(_schema())
    assert PAGE.exists(), "docs/configuration.md is missing: run `python scripts/gen_config_docs.py`"
    assert PAGE.read_text(encoding="utf-8") == expected, (
        "docs/configuration.md is stale (schemas/config.schema.yaml changed): run `python scripts/gen_config_docs.py`"
    )


def test_check_mode_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    gen = _generator()
    stale = tmp_path / "docs" / "configuration.md"
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "PAGE", stale)
    assert gen.main(["--check"]) == 1  # missing
    gen.main([])
    assert gen.main(["--check"]) == 0
    stale.write_text(stale.read_text() + "edited\n")
    assert gen.main(["--check"]) == 1
    assert "docs/configuration.md" in capsys.readouterr().err


def test_every_schema_key_is_documented():
    schema = _schema()
    page = PAGE.read_text(encoding="utf-8")
    keys = set().union(*(_schema_keys(sub, schema, name) for name, sub in schema["properties"].items()))
    assert len(keys) > 100
    missing = sorted(k for k in keys if f"| `{k}` |" not in page)
    assert not missing, f"keys missing from docs/configuration.md: {missing}"
    for name in schema["properties"]:
        assert f"\n## `{name}`\n" in page, f"no section for top-level key {name!r}"


def test_readme_is_short_and_has_both_commands():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    blocks = _bash_blocks(text)
    ci = _ci_commands()
    assert len(ci) == 1, f".ci/run should run one command line, found {ci}"
    assert ci[0] in blocks, f"README.md's test command is not .ci/run's: {ci[0]!r}"
    assert RUN_COMMAND in blocks, f"README.md lacks the run command {RUN_COMMAND!r}"


def test_readme_names_every_rule_and_links_resolve():
    text = README.read_text(encoding="utf-8")
    smk = "".join(p.read_text() for p in sorted((REPO / "rules").glob("*.smk")))
    rules = re.findall(r"^rule (\w+):", smk, re.M)
    assert rules
    missing = [r for r in rules if f"`{r}`" not in text]
    assert not missing, f"rules missing from README.md's rules table: {missing}"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"


def test_nav_lists_every_page():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"

    def pages(nav):
        for entry in nav:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from pages(value) if isinstance(value, list) else [value]

    nav = list(pages(config["nav"]))
    for page in nav:
        assert (DOCS / page).is_file(), f"mkdocs.yml's nav lists {page}, which is not in docs/"
    on_disk = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(nav) == on_disk, f"nav {sorted(nav)} != docs/*.md {on_disk}"


def test_mkdocs_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[test]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
