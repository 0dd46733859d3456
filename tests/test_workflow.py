"""The workflow end to end on the tiny config, in a temporary directory, through the snakemake CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def snakemake(workdir, *args, configfile=TINY, check=True):
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(configfile), "--cores", "2", "--quiet", "rules", *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    snakemake(workdir)
    return workdir


@pytest.mark.slow
def test_uniform_dag_end_to_end(tiny_run):
    res = tiny_run / "results" / "tiny"
    assert (res / "model.pt").is_file() and (res / "calibration.pt").is_file()
    table = pd.read_csv(res / "eval" / "uniform.csv")
    assert sorted(table.option) == ["w2a8", "w8a8"]
    w8 = json.loads((res / "eval" / "uniform" / "w8a8.json").read_text())
    assert w8["top1"] > 0.8 and abs(w8["top1"] - w8["fp_top1"]) < 0.03
    assert w8["avg_bits"] == pytest.approx(8.0)
    w2 = table.set_index("option").loc["w2a8"]
    assert w2.size_mb < w8["size_mb"] and w2.avg_bits < 8
    for log in ("train_model.log", "calibrate.log", "eval/uniform/w8a8.log"):
        assert (tiny_run / "logs" / "tiny" / log).stat().st_size > 0
    # Nothing to do on a second run: every artifact is cached.
    again = snakemake(tiny_run, "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_invalid_config_fails_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("w_bits: [2, 8]", "w_bits: [2, 32]"))
    proc = snakemake(tmp_path, configfile=bad, check=False)
    assert proc.returncode != 0
    assert "config key 'quant.w_bits[1]': 32 is greater than the maximum of 16" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
