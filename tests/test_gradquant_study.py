"""The gradient-quantization study: its config (runs, per-run params, checks), its table, verdict and
plots from run records, and `snakemake gradquant` end to end on a tiny config (slow)."""

import copy
import json
import re

import pandas as pd
import pytest
import yaml
from conftest import run_snakemake

from mpqflow.config import ConfigError, GradQuantStudyConfig, validate_config
from mpqflow.gradquant_study import gradquant_report, gradquant_tables, plot_gradquant

RAW = {"models": {"m": {"arch": "digits_cnn", "dataset": {"name": "digits"}, "train": {"batch_size": 8}}}}


def test_runs_and_run_specs():
    cfg = validate_config(RAW)
    study = GradQuantStudyConfig.from_dict(cfg["gradquant"])
    assert study.runs()[:4] == ["none", "qsgd-2bit", "qsgd-3bit", "qsgd-4bit"] and len(study.runs()) == 19
    assert study.study_models(["m"]) == ["m"]
    assert study.run_spec("none") == {"world_size": 2, "epochs": 20, "grad_quant": None}
    assert study.run_spec("amq_nb-4bit")["grad_quant"] == {
        "method": "amq_nb", "bits": 4, "bucket_size": 8192, "norm": "l2", "update_iters": [10, 100, 300]
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown gradquant run 'alq-9bit'"):
        study.run_spec("alq-9bit")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"models": ["nope"]}, r"'gradquant.models\[0\]': 'nope' is not a configured model"),
        ({"world_size": 16}, r"'gradquant.world_size': 16 processes need a batch_size of at least 16"),
        ({"world_size": 1}, r"gradquant.world_size"),
        ({"methods": ["topk"]}, r"gradquant.methods"),
        ({"bits": [1]}, r"gradquant.bits"),
    ],
)
def test_bad_study_config_names_the_key(change, match):
    raw = copy.deepcopy(RAW) | {"gradquant": change}
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def _record(method, bits, variance, top1=0.9, wire=1000.0, refits=0):
    gq = None if method == "none" else {"method": method, "bits": bits, "update_iters": [2, 5]}
    return {
        "run": method if method == "none" else f"{method}-{bits}bit", "method": method, "bits": bits,
        "world_size": 2, "epochs": 1, "steps": len(variance), "settings": {"grad_quant": gq},
        "top1": top1, "test_loss": 0.5, "train_history": [{"epoch": 1, "loss": 0.7, "accuracy": 0.8, "step": 6}],
        "variance": [[i + 1, v] for i, v in enumerate(variance)], "levels": [], "level_refits": refits,
        "bytes_sent_per_step": wire * 0.9, "bytes_fp32_per_step": 10000.0, "wire_bytes_per_step": wire,
        "seconds": 1.0,
    }  # fmt: skip


def test_table_summarises_the_steps_after_the_first_update_and_the_verdict_names_the_numbers(tmp_path):
    records = [
        _record("none", 32, [0.0] * 6, wire=10000.0),
        _record("qsgd", 3, [4, 4, 4, 4, 4, 4]),
        _record("nuqsgd", 3, [9, 9, 2, 2, 2, 2]),
        _record("alq", 3, [9, 9, 1, 1, 0.5, 0.5], refits=2),
    ]
    table, curves = gradquant_tables(records)
    assert list(table["run"]) == ["none", "qsgd-3bit", "nuqsgd-3bit", "alq-3bit"]
    row = table.set_index("run")
    assert row.loc["alq-3bit", "variance_after_update"] == pytest.approx(0.75)  # steps 3..6 (after step 2)
    assert row.loc["nuqsgd-3bit", "variance_after_update"] == pytest.approx(2.0)
    assert row.loc["qsgd-3bit", "wire_ratio_to_none"] == pytest.approx(0.1)
    assert len(curves) == 24 and set(curves.columns) == {"run", "method", "bits", "step", "variance"}
    text = gradquant_report(table)
    assert "At 3 bits, adaptive levels beat the fixed ones: the best, alq, has normalised variance 0.75" in text
    assert "5.33x lower than qsgd (4)" in text and "2.67x lower than nuqsgd (2)" in text
    worse = [*records[:3], _record("alq", 3, [9, 9, 3, 3, 3, 3])]
    assert "adaptive levels do not beat the fixed ones" in gradquant_report(gradquant_tables(worse)[0])
    variance, accuracy = plot_gradquant(
        table, curves, str(tmp_path / "v.png"), str(tmp_path / "a.png"), dpi=40, width=3
    )
    for png in ("v.png", "a.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what a reader checks: a panel per bit-width with a curve per quantized method, bars per method
    (panel,) = variance.axes
    assert panel.get_title() == "3 bits per coordinate" and panel.get_xlabel() == "iteration (optimizer step)"
    assert panel.get_ylabel().startswith("normalised variance") and panel.get_yscale() == "log"
    methods = ["qsgd", "nuqsgd", "alq"]
    assert [line.get_label() for line in panel.get_lines()] == [*methods, "first level update (step 2)"]
    assert [t.get_text() for t in panel.get_legend().get_texts()] == [*methods, "first level update (step 2)"]
    acc_ax, byte_ax = accuracy.axes
    assert acc_ax.get_ylabel() == "held-out top-1 accuracy (%)"
    assert byte_ax.get_ylabel() == "bytes written to the wire per process and step (kB, log)"
    for ax in (acc_ax, byte_ax):
        assert ax.get_xlabel() == "bits per gradient coordinate" and ax.get_title()
        assert [(c.get_label(), len(c)) for c in ax.containers] == [(m, 1) for m in methods]  # one bar per bits
    legend = [t.get_text() for t in byte_ax.get_legend().get_texts()]
    assert sorted(legend) == sorted([*methods, "none (float32 all-reduce)"])
    with pytest.raises(ValueError, match="no runs"):
        gradquant_tables([])


@pytest.mark.slow
def test_gradquant_target_runs_the_study_and_adds_runs_without_rerunning_others(tmp_path):
    """`snakemake gradquant` on digits_cnn: float32 all-reduce, qsgd and alq_nb at 3 bits on 2
    processes; the table, curves, report and plots exist; ALQ's variance is below QSGD's after its
    update, the quantized runs write ~1/10 of the float32 bytes to the wire (measured), and adding
    a bit-width runs only its runs."""
    config = {
        "seed": 0, "device": "cpu", "threads": 1,
        "models": {"d": {"arch": "digits_cnn", "dataset": {"name": "digits"}, "train": {"epochs": 2}}},
        "methods": ["uniform"], "finetune": None, "ptq": None,
        "gradquant": {"methods": ["none", "qsgd", "alq_nb"], "bits": [3], "epochs": 2, "update_iters": [3],
                      "bucket_size": 512},
    }  # fmt: skip
    path = tmp_path / "gq.yaml"
    path.write_text(yaml.safe_dump(config))
    run_snakemake(tmp_path, "gradquant", configfile=path, timeout=600)
    res = tmp_path / "results" / "d"
    table = pd.read_csv(res / "gradquant.csv").set_index("run")
    assert list(table.index) == ["none", "qsgd-3bit", "alq_nb-3bit"]
    assert table.loc["alq_nb-3bit", "variance_after_update"] < 0.5 * table.loc["qsgd-3bit", "variance_after_update"]
    assert table.loc["alq_nb-3bit", "level_refits"] == 1 and table.loc["qsgd-3bit", "level_refits"] == 0
    for run in ("qsgd-3bit", "alq_nb-3bit"):
        assert 3 / 32 < table.loc[run, "wire_ratio_to_none"] < 0.13
    assert table.loc["none", "wire_bytes_per_step"] >= table.loc["none", "bytes_fp32_per_step"]
    assert (table["top1"] > 0.3).all()
    record = json.loads((res / "gradquant" / "alq_nb-3bit.json").read_text())
    assert record["steps"] == 2 * 22 and len(record["variance"]) == 44 and len(record["levels"]) == 4
    assert "At 3 bits, adaptive levels beat the fixed ones" in (res / "gradquant.md").read_text()
    for png in ("gradquant_variance.png", "gradquant_accuracy.png"):
        assert (res / "plots" / png).stat().st_size > 10_000
    assert not (res / ".gradquant_state").exists() or not any((res / ".gradquant_state").rglob("epoch.pt"))
    config["gradquant"]["bits"] = [3, 2]
    path.write_text(yaml.safe_dump(config))
    out = run_snakemake(tmp_path, "gradquant", "--dry-run", configfile=path, timeout=120).stdout
    runs = sorted(set(re.findall(r"output: results/d/gradquant/([\w-]+)\.json", out)))
    assert runs == ["alq_nb-2bit", "qsgd-2bit"], out[-2000:]
