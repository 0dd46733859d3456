"""`snakemake --report`: the README's command on a fresh clone, on a partial run and on a finished one;
the report holds the main tables, and the heat map only where a pairwise method (CLADO) feeds it."""

import copy
import shutil
import subprocess
import sys

import yaml
from conftest import REPO, TINY, run_snakemake, snakemake_env

REPORT = "results/report.html"  # the README's command: snakemake --report results/report.html


def _tracked_copy(dest):
    """The repository's tracked files (what a fresh clone has), working-tree versions, copied to `dest`."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)


def test_the_readme_report_command_works_on_a_fresh_clone(tmp_path):
    _tracked_copy(tmp_path)
    assert not (tmp_path / "results").exists()
    readme = (REPO / "README.md").read_text()
    assert f"snakemake --report {REPORT}" in readme
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--report", REPORT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=snakemake_env(),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / REPORT).stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["report.html"]  # no result was made
    assert "the report leaves out what this run has not made yet" in proc.stderr
    assert "results/digits_resnet20/study.csv" in proc.stderr


def test_a_partial_run_reports_what_it_made_and_names_the_rest(tmp_path):
    run_snakemake(tmp_path, "results/tiny/eval/uniform.csv")
    proc = run_snakemake(tmp_path, "--report", REPORT)
    html = (tmp_path / REPORT).read_text()
    assert "uniform.csv" in html and "study.csv" not in html
    missing = proc.stderr.split("has not made yet: ")[1].splitlines()[0]
    assert "results/tiny/study.csv" in missing and "results/tiny/eval/uniform.csv" not in missing


def test_a_finished_run_reports_the_main_tables_and_every_figure(tiny_run, tmp_path):
    out = tmp_path / "report.html"  # outside the shared run's results/
    proc = run_snakemake(tiny_run, "--report", str(out))
    assert "has not made yet" not in proc.stderr
    html = out.read_text()
    for name in ("study.csv", "uniform.csv", "finetune.csv", "ptq.csv", "sanity.csv", "pareto_auc.csv"):
        assert name in html, name
    for png in ("accuracy_vs_size", "pareto_auc", "estimated_vs_measured", "interaction_heatmap", "layer_bits"):
        assert f"{png}.png" in html, png


def test_without_a_pairwise_method_no_heat_map_is_drawn(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw = copy.deepcopy(raw)
    raw["methods"] = ["uniform", "mpqco", "hawq"]
    raw["finetune"]["targets"] = [{"method": "uniform", "option": "w2a8"}]
    config = tmp_path / "no_clado.yaml"
    config.write_text(yaml.safe_dump(raw))
    dry = run_snakemake(tmp_path, "--dry-run", configfile=config).stdout
    assert "rule study_plots:" in dry and "interaction_heatmap" not in dry
    with_clado = run_snakemake(tmp_path, "--dry-run").stdout
    assert "rule interaction_heatmap:" in with_clado and "interaction_heatmap.png" in with_clado
