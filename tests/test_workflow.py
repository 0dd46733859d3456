"""The workflow end to end on the tiny config, in a temporary directory, through the snakemake CLI."""

import io
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, TINY, run_snakemake


def snakemake(workdir, *args, configfile=TINY, check=True):
    return run_snakemake(workdir, "--quiet", "rules", *args, configfile=configfile, check=check)


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
    caps = json.loads((res / "budgets.json").read_text())  # every budget checked against the layer table
    assert sorted(caps) == ["avg_bits-4", "avg_bits-6"] and all(c["size_cap_bits"] > 0 for c in caps.values())
    for log in ("train_model.log", "calibrate.log", "check_budgets.log", "eval/uniform.log"):
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


def test_user_configfile_is_the_whole_config(tmp_path):
    """--configfile replaces the embedded default (its digits_resnet20 is not merged in), also where a
    config.yaml lies in the working directory; the PTQ study is off with `ptq: null`."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    user = tmp_path / "my.yaml"
    user.write_text(TINY.read_text().split("ptq:")[0] + "ptq: null\n")
    out = run_snakemake(tmp_path, "--dry-run", configfile=user).stdout  # every job with its outputs
    assert "results/tiny/study.csv" in out and "results/tiny/model.pt" in out
    assert "digits_resnet20" not in out and "ptq" not in out


@pytest.mark.slow
def test_report_of_a_complete_and_of_a_partly_finished_run(tiny_run, tmp_path):
    """`snakemake --report` reports what a run has made and names what it has not made yet."""
    full = run_snakemake(tiny_run, "--report", str(tmp_path / "full.html"))
    assert (tmp_path / "full.html").stat().st_size > 0 and "leaves out" not in full.stderr
    partial = tmp_path / "partial"
    run_snakemake(partial, "results/tiny/eval/uniform.csv", "--quiet", "rules")
    proc = run_snakemake(partial, "--report", str(tmp_path / "partial.html"))
    assert (tmp_path / "partial.html").stat().st_size > 0
    assert "the report leaves out what this run has not made yet: results/tiny/budgets.json" in proc.stderr
    assert "results/tiny/study.csv" in proc.stderr and "eval/uniform.csv" not in proc.stderr


def test_device_cuda_without_cuda_fails_before_any_job(tmp_path, monkeypatch):
    """`device: cuda` where jobs run on this machine and it has no CUDA: onstart stops the run."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides any GPU, so the check fires on every machine
    bad = tmp_path / "cuda.yaml"
    bad.write_text(TINY.read_text().replace("device: cpu", "device: cuda"))
    proc = snakemake(tmp_path, configfile=bad, check=False)
    assert proc.returncode != 0
    assert "config key 'device': 'cuda' but this machine has no CUDA device" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_unachievable_budget_stops_right_after_calibration(tmp_path):
    """A budget no decision can meet (the fixed first/last layers keep avg_bits above 2.1) passes
    validation but stops the run at check_budgets, the first job after calibration: no solve runs,
    and at most the one sensitivity batch that started beside it is written."""
    bad = tmp_path / "budget.yaml"
    config = yaml.safe_load(TINY.read_text())
    # No fine-tuning: its target names a budget of the tiny config, which this one no longer has.
    config.update(budgets=["avg_bits-2.1"], finetune=None)
    bad.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, configfile=bad, check=False)
    assert proc.returncode != 0
    log = (tmp_path / "logs" / "tiny" / "check_budgets.log").read_text()
    assert "budget avg_bits-2.1 is infeasible: the smallest achievable size" in log
    res = tmp_path / "results" / "tiny"
    assert (res / "layers.json").is_file() and not (res / "budgets.json").exists()
    assert len(list(res.glob("sensitivity/*/batch_*.npz"))) <= 1 and not (res / "decisions").exists()


def _decisions(workdir):
    """{relative path: decision without its timings} of every decision file of a run."""
    out = {}
    for p in sorted((workdir / "results" / "tiny" / "decisions").rglob("*.json")):
        d = json.loads(p.read_text())
        d["solver"] = {k: v for k, v in d["solver"].items() if k != "seconds"}
        out[str(p.relative_to(workdir))] = d
    return out


@pytest.mark.slow
def test_study_end_to_end(tiny_run):
    res = tiny_run / "results" / "tiny"
    study = pd.read_csv(res / "study.csv")
    methods = ["clado", "clado_naive", "clado_raw", "hawq", "limpq", "mpqco"]
    searched = study[study.method != "uniform"]
    # One row per (method, set, budget): 6 methods x 2 sets (sizes 1 and 2) x 2 budgets, plus 2 uniform rows.
    assert sorted(searched.method.unique()) == methods and len(searched) == 6 * 2 * 2
    assert (study.method == "uniform").sum() == 2
    for row in searched.itertuples():
        cap = float(row.budget.split("-")[1])
        assert row.avg_bits <= cap + 1e-9, row
        assert row.solver_status == "optimal"
        assert np.isfinite(row.estimated_loss_increase) and np.isfinite(row.measured_loss_increase)
    # The tiny problem has 2 layers x 2 options: at 6 average bits every method can keep both layers
    # near 8 bits, so the searched decisions are at least as accurate as uniform W2A8.
    w2 = study[(study.method == "uniform") & (study.option == "w2a8")].top1.item()
    assert searched[searched.budget == "avg_bits-6"].top1.min() >= w2 - 0.02
    for png in ("accuracy_vs_size", "pareto_auc", "estimated_vs_measured", "interaction_heatmap", "layer_bits"):
        head = (res / "plots" / f"{png}.png").read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n", png
    auc = pd.read_csv(res / "pareto_auc.csv")
    assert sorted(auc.method.unique()) == methods and auc.auc.between(0, 1).all()
    # the no-budget sanity check: one row per (method, set), its verdict on every decision of that set
    sanity = pd.read_csv(res / "sanity.csv")
    assert sorted(sanity.method.unique()) == methods and len(sanity) == 6 * 2
    assert (sanity.passes == (sanity.layers_at_highest == sanity.layers)).all() and (sanity.highest == "w8a8").all()
    at_highest = sanity.estimated_at_highest.fillna(np.inf)  # empty where the method forbids the highest option
    assert (sanity.estimated_loss_increase <= at_highest + 1e-4 * at_highest.abs() + 1e-12).all()  # the optimum
    verdict = {(r.method, r.set_size, r.set_id): r.passes for r in sanity.itertuples()}
    assert all(r.sanity_pass == verdict[(r.method, r.set_size, r.set_id)] for r in searched.itertuples())
    assert sanity.passes[sanity.method == "mpqco"].all()  # squared errors: smallest at 8 bits
    calib = pd.read_csv(res / "calibration.csv")  # per method and set size: 2 budgets x 1 set
    assert len(calib) == 6 * 2 and (calib.decisions == 2).all() and (calib.mae >= 0).all()


@pytest.mark.slow
def test_finetune_end_to_end(tiny_run):
    """The tiny config fine-tunes two decisions (one LIMPQ's) and a uniform option on 2 gloo processes (torchrun)."""
    res = tiny_run / "results" / "tiny"
    ft = pd.read_csv(res / "finetune.csv")
    assert list(ft.method) == ["clado", "limpq", "uniform"]
    assert list(ft.target) == ["set_2x0/avg_bits-4", "set_1x0/avg_bits-4", "w2a8"]
    assert (ft.world_size == 2).all() and (ft.epochs == 2).all()
    # The tiny CNN at 2-bit weights loses much of its accuracy in PTQ; two epochs of LSQ win most of it back.
    assert (ft.top1_qat > ft.top1_ptq + 0.1).all(), ft
    study = pd.read_csv(res / "study.csv")
    qat = study.dropna(subset=["top1_qat"])
    assert sorted(zip(qat.method, qat.option.fillna(qat.budget), qat.set_size.fillna(0))) == [
        ("clado", "avg_bits-4", 2),
        ("limpq", "avg_bits-4", 1),
        ("uniform", "w2a8", 0),
    ]
    for name in ("clado/set_2x0/avg_bits-4", "limpq/set_1x0/avg_bits-4", "uniform/w2a8"):
        for suffix in (".pt", ".json", ".export.pt", ".export.json"):
            assert (res / "finetuned" / f"{name}{suffix}").is_file(), name + suffix
        log = (tiny_run / "logs" / "tiny" / "finetune" / f"{name}.log").read_text()
        assert log.count("finetune epoch 2/2") == 1, log[-2000:]  # rank 0 alone logs
    assert (res / "plots" / "finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((res / ".finetune_state").rglob("*.pt")), "epoch checkpoints outlive their job"


@pytest.mark.slow
def test_same_config_same_decisions(tiny_run):
    first = _decisions(tiny_run)
    assert len(first) == 24
    study = (tiny_run / "results" / "tiny" / "study.csv").read_text()
    snakemake(tiny_run, "--forcerun", "solve_budget")
    assert _decisions(tiny_run) == first
    cols = lambda text: pd.read_csv(io.StringIO(text)).drop(columns=["solver_seconds"])  # noqa: E731
    pd.testing.assert_frame_equal(cols(study), cols((tiny_run / "results" / "tiny" / "study.csv").read_text()))


@pytest.mark.slow
def test_limpq_indicators_on_two_processes_are_reproducible(tiny_run):
    """Rule limpq_indicators trains each set's indicators on 2 gloo processes; a forced rerun gives
    the same arrays, byte for byte (seeded draws, deterministic data order)."""
    sens = tiny_run / "results" / "tiny" / "sensitivity" / "limpq"
    files = sorted(sens.glob("set_*.npz"))
    assert [f.name for f in files] == ["set_1x0.npz", "set_2x0.npz"]
    before = {f.name: np.load(f) for f in files}
    before = {k: {a: v[a].copy() for a in ("w_indicator", "a_indicator", "count")} for k, v in before.items()}
    for f in files:
        log = (tiny_run / "logs" / "tiny" / "sensitivity" / "limpq" / f"{f.stem}.log").read_text()
        assert "on 2 process(es)" in log and log.count("limpq epoch 3/3") == 1, log[-2000:]
    assert int(before["set_1x0.npz"]["count"]) == 32 and int(before["set_2x0.npz"]["count"]) == 64
    assert not list((tiny_run / "results" / "tiny" / ".limpq_state").rglob("*.pt"))
    snakemake(tiny_run, "--forcerun", "limpq_indicators")
    for name, arrays in before.items():
        again = np.load(sens / name)
        for key, value in arrays.items():
            np.testing.assert_array_equal(again[key], value, err_msg=f"{name}: {key}")
