"""The fine-tuning stage (mpqflow/stages/finetune.py) and its config, tables and plot, without Snakemake.

A small digits CNN is trained once per module and calibrated; W2A4 is where post-training
quantization loses accuracy and LSQ fine-tuning must win it back. The 2-process run goes through
torchrun (gloo), as the rule runs it. The workflow (rule, study columns, SLURM) is checked on the
tiny run in test_workflow.py and test_slurm.py.
"""

import copy
import json
import sys

import pandas as pd
import pytest
import torch
import yaml

from mpqflow.artifacts import load_layer_table, save_decision
from mpqflow.config import Config, ConfigError, FinetuneConfig, Runtime, finetune_target_names, validate_config
from mpqflow.data import data_spec, load_split
from mpqflow.finetuned import load_finetuned, read_finetuned
from mpqflow.metrics import evaluate as evaluate_fp
from mpqflow.models import fresh_model
from mpqflow.quant import load_export, read_export
from mpqflow.stages import calibrate, evaluate, finetune_report, study, train
from mpqflow.stages.finetune import run_finetune

pytestmark = pytest.mark.usefixtures("one_thread")

RAW = {
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "models": {"m": {"arch": "digits_cnn", "dataset": {"name": "digits"}, "train": {"epochs": 4, "lr": 0.1}}},
    "quant": {"w_bits": [2, 4, 8], "a_bits": [4, 8], "calibration_samples": 64, "calibration_batch_size": 32},
    "sensitivity": {"batch_size": 16, "pool_batches": 2},
    "methods": ["uniform", "mpqco"],
    "budgets": ["avg_bits-3"],
    "study": {"set_sizes": [1], "sets_per_size": 1},
    "finetune": {"targets": [{"method": "uniform", "option": "w2a4"}], "epochs": 3, "lr": 0.01},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(cfg, dir) with the model trained and calibrated, and the PTQ evaluation of uniform W2A4."""
    cfg = Config.from_dict(validate_config(RAW))
    d = tmp_path_factory.mktemp("finetune")
    m = cfg.models["m"]
    train.train_or_load(m, cfg.seed, cfg.evaluation, cfg.runtime, str(d / "model.pt"))
    calibrate.calibrate(m, cfg.quant, cfg.seed, cfg.runtime, str(d / "model.pt"), str(d / "calibration.pt"),
                        str(d / "layers.json"), plan=cfg.sample_plan)  # fmt: skip
    ptq = str(d / "eval" / "uniform" / "w2a4.json")
    evaluate.evaluate_uniform(m, cfg.quant, cfg.seed, cfg.evaluation, cfg.runtime, str(d / "model.pt"),
                              str(d / "calibration.pt"), ["w2a4"], [ptq])  # fmt: skip
    return cfg, d


def _job(cfg, d, target, name, world_size=1, out_dir=None, **settings):
    """run_finetune's job for the model in `d`; outputs under `out_dir` (default `d`)."""
    out_dir = d if out_dir is None else out_dir
    out = out_dir / "finetuned" / name
    s = FinetuneConfig.from_dict({**cfg.finetune.to_dict(), "world_size": world_size, **settings})
    outputs = {k: f"{out}{suffix}" for k, suffix in
               (("model", ".pt"), ("export", ".export.pt"), ("export_meta", ".export.json"))}  # fmt: skip
    return dict(model=cfg.models["m"], quant=cfg.quant, seed=cfg.seed, settings=s,
                checkpoint=str(d / "model.pt"),
                calibration=str(d / "calibration.pt"), target=target, outputs=outputs,
                state_dir=str(out_dir / ".finetune_state" / name))  # fmt: skip


def _evaluate(cfg, d, job):
    """The rule evaluate_finetuned: the eval JSON beside the model file."""
    out = job["outputs"]["model"].removesuffix(".pt") + ".json"
    m = cfg.models["m"]
    return evaluate.evaluate_finetuned(m, cfg.quant, cfg.seed, cfg.evaluation, cfg.runtime, str(d / "model.pt"),
                                       str(d / "calibration.pt"), job["outputs"]["model"], out), out  # fmt: skip


@pytest.fixture(scope="module")
def w2a4(run):
    """The fine-tuned uniform W2A4 model (1 process) and its evaluation: (metrics, job, eval path)."""
    cfg, d = run
    job = _job(cfg, d, {"option": "w2a4"}, "uniform/w2a4")
    record = run_finetune(job, Runtime("cpu", 1, 600.0))
    metrics, path = _evaluate(cfg, d, job)
    assert {k: metrics[k] for k in record} == record
    return metrics, job, path


def _test_set(cfg):
    return load_split(data_spec(cfg.models["m"], cfg.seed), "test")


def test_w2a4_fine_tuning_recovers_what_ptq_lost(run, w2a4):
    cfg, d = run
    qat, job, _ = w2a4
    ptq = json.loads((d / "eval" / "uniform" / "w2a4.json").read_text())
    print(f"W2A4 digits_cnn: FP {ptq['fp_top1']:.4f}, PTQ {ptq['top1']:.4f}, QAT {qat['top1']:.4f}")
    assert ptq["top1"] < ptq["fp_top1"] - 0.05, "W2A4 PTQ should lose accuracy on this model"
    assert qat["top1"] > ptq["top1"] + 0.05 and qat["loss"] < ptq["loss"]
    assert qat["top1"] > ptq["fp_top1"] - 0.05
    # The eval/ schema: every key of the PTQ evaluation (same sizes: the same assignment), plus the run's record.
    assert set(ptq) - {"seconds"} <= set(qat)
    for k in ("size_mb", "avg_bits", "gbitops"):
        assert qat[k] == pytest.approx(ptq[k])
    assert (qat["method"], qat["option"], qat["epochs"], qat["world_size"]) == ("uniform", "w2a4", 3, 1)
    assert not (d / ".finetune_state" / "uniform" / "w2a4").exists(), "epoch checkpoints outlive the outputs"


def test_saved_model_and_integer_export_reproduce_the_accuracy(run, w2a4):
    cfg, _ = run
    qat, job, _ = w2a4
    test = _test_set(cfg)
    net = load_finetuned(job["outputs"]["model"])  # from the file alone
    assert evaluate_fp(net, test, 256, torch.device("cpu"))["top1"] == pytest.approx(qat["top1"])
    state = read_export(job["outputs"]["export"])
    ints = [t for k, t in state["tensors"].items() if k.endswith(".weight_int")]
    assert ints and all(t.dtype == torch.int8 for t in ints)
    meta = json.loads(open(job["outputs"]["export_meta"]).read())
    quantized = {l: v for l, v in meta["layers"].items() if v["w_bits"] is not None}
    assert any(v["w_bits"] == 2 for v in quantized.values())
    for l, v in quantized.items():  # codes within each layer's signed grid
        t = state["tensors"][f"{l}.weight_int"]
        assert -(2 ** (v["w_bits"] - 1)) <= int(t.min()) and int(t.max()) <= 2 ** (v["w_bits"] - 1) - 1
    spec = data_spec(cfg.models["m"], cfg.seed)
    fresh = fresh_model(cfg.models["m"], cfg.seed)
    assert spec.num_classes == 10
    exported = load_export(fresh, state)
    assert evaluate_fp(exported, test, 256, torch.device("cpu"))["top1"] == pytest.approx(qat["top1"])


def test_decision_on_two_gloo_processes(run, tmp_path):
    """A searched decision through torchrun with 2 ranks: the eval names the decision; rank 0 alone logs."""
    cfg, d = run
    table = load_layer_table(d / "layers.json")
    choice = ["w2a4" if i % 2 else "w4a8" for i in range(len(table.candidates))]
    decision = tmp_path / "decisions" / "mpqco" / "set_1x0" / "avg_bits-3.json"
    save_decision(decision, {"method": "mpqco", "budget": "avg_bits-3", "set_size": 1, "set_id": 0,
                             "candidates": list(table.candidates), "choice": choice})  # fmt: skip
    name = "mpqco/set_1x0/avg_bits-3"
    job = _job(cfg, d, {"decision": str(decision)}, name, world_size=2, out_dir=tmp_path, epochs=1)
    log = tmp_path / "job.log"
    stderr, sys.stderr = sys.stderr, open(log, "w", buffering=1)  # as io.setup_logging sends it to the rule's log
    try:
        record = run_finetune(job, Runtime("cpu", 2, 600.0))
    finally:
        sys.stderr.close()
        sys.stderr = stderr
    qat, _ = _evaluate(cfg, d, job)
    assert {k: qat[k] for k in record} == record
    assert (qat["method"], qat["budget"], qat["set_size"], qat["set_id"]) == ("mpqco", "avg_bits-3", 1, 0)
    assert qat["choice"] == " ".join(choice) and qat["world_size"] == 2 and qat["top1"] > 0.5
    text = log.read_text()
    assert text.count("epoch 1/1") == 1, f"one rank-0 epoch line expected:\n{text[-3000:]}"
    assert read_finetuned(job["outputs"]["model"])["assignment"] == {
        l: list(o)
        for l, o in table.full_assignment({c: (int(o[1]), int(o[3])) for c, o in zip(table.candidates, choice)}).items()
    }


def test_a_model_file_of_another_checkpoint_or_format_is_refused(run, w2a4, tmp_path):
    cfg, d = run
    _, job, _ = w2a4
    ckpt = read_finetuned(job["outputs"]["model"])
    ckpt["checkpoint_sha256"] = "0" * 64
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt: fine-tuned from another FP checkpoint"):
        evaluate.evaluate_finetuned(cfg.models["m"], cfg.quant, cfg.seed, cfg.evaluation, cfg.runtime,
                                    str(d / "model.pt"), str(d / "calibration.pt"), str(tmp_path / "other.pt"),
                                    str(tmp_path / "other.json"))  # fmt: skip
    assert not (tmp_path / "other.json").exists()
    with pytest.raises(ValueError, match=r"model.pt: not a fine-tuned model written by mpqflow"):
        read_finetuned(d / "model.pt")


def test_tables_pair_each_fine_tuned_target_with_its_ptq_evaluation(run, w2a4, tmp_path):
    cfg, d = run
    qat, _, qat_path = w2a4
    ptq = str(d / "eval" / "uniform" / "w2a4.json")
    df = finetune_report.finetune_table([qat_path], [ptq], str(tmp_path / "finetune.csv"))
    row = df.iloc[0]
    assert (row.method, row.target, row.top1_qat, row.epochs) == ("uniform", "w2a4", qat["top1"], 3)
    assert row.top1_ptq == json.loads(open(ptq).read())["top1"]
    s = study.study_table([ptq], [], str(tmp_path / "study.csv"), [qat_path])
    assert s.loc[s.option == "w2a4", "top1_qat"].item() == pytest.approx(qat["top1"])
    assert pd.read_csv(tmp_path / "study.csv").columns.tolist()[-3:] == ["top1_qat", "loss_qat", "sanity_pass"]
    finetune_report.plot_finetune_table(str(tmp_path / "finetune.csv"), str(tmp_path / "ft.png"), cfg.plots)
    assert open(tmp_path / "ft.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    other = copy.deepcopy(json.loads(open(ptq).read()))
    other["option"] = "w8a8"
    (tmp_path / "w8a8.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="evaluate different decisions"):
        finetune_report.finetune_table([qat_path], [str(tmp_path / "w8a8.json")], str(tmp_path / "x.csv"))


def test_distillation_loss_is_cross_entropy_at_weight_zero_and_kl_at_one():
    from mpqflow.train.losses import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ce, _ = distillation_loss(teacher, 0.0, 2.0)(student, x, y)
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(student(x), y).item())
    kl, _ = distillation_loss(teacher, 1.0, 2.0)(student, x, y)
    p_t = torch.softmax(teacher(x) / 2, 1)
    ref = (p_t * (p_t.log() - torch.log_softmax(student(x) / 2, 1))).sum(1).mean() * 4
    assert kl.item() == pytest.approx(ref.item(), rel=1e-5)
    same, _ = distillation_loss(student, 1.0, 2.0)(student, x, y)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


# --- config ---------------------------------------------------------------------------------------


def _default_raw():
    from pathlib import Path

    return yaml.safe_load((Path(__file__).resolve().parent.parent / "config.yaml").read_text())


def _finetune(section):
    return validate_config({**_default_raw(), "finetune": section})["finetune"]


def test_default_config_fine_tunes_clado_and_mpqco_at_the_lowest_budget_of_set_size_4():
    cfg = Config.from_dict(validate_config(_default_raw()))
    assert list(cfg.finetune_targets[:2]) == ["clado/set_4x0/avg_bits-2.5", "mpqco/set_4x0/avg_bits-2.5"]
    assert "targets" not in cfg.finetune.to_dict() and cfg.finetune.train_settings().epochs == cfg.finetune.epochs


def test_targets_are_canonical_and_all_expands_every_decision():
    ft = _finetune({"targets": [{"method": "clado", "set": "4x1", "budget": "avg_bits-3.0"}]})
    assert ft["targets"] == [{"method": "clado", "set": "4x1", "budget": "avg_bits-3"}]
    raw = _default_raw()
    n = len([m for m in raw["methods"] if m != "uniform"]) * 4 * len(raw["budgets"])  # 2 sizes x 2 sets
    assert len(_finetune({"targets": "all"})["targets"]) == n
    assert _finetune(None)["targets"] == [] and _finetune({})["targets"] == []
    assert finetune_target_names(_finetune({"targets": "all"}))[0] == "mpqco/set_1x0/avg_bits-2.25"


@pytest.mark.parametrize(
    "section, message",
    [
        ({"targets": [{"method": "clado", "set": "8x0", "budget": "avg_bits-3"}]},
         r"'finetune.targets\[0\]': set '8x0' is not a sensitivity set"),
        ({"targets": [{"method": "clado_kl", "set": "4x0", "budget": "avg_bits-3"}]},
         r"'finetune.targets\[0\]': method 'clado_kl' is not a search method of `methods`"),
        ({"targets": [{"method": "clado", "set": "4x0", "budget": "avg_bits-5"}]},
         r"budget 'avg_bits-5' is not one of `budgets`"),
        ({"targets": [{"method": "clado", "set": "4x0", "budget": "cheap"}]}, r"budget 'cheap' is not one of"),
        ({"targets": [{"method": "uniform", "option": "w3a4"}]}, r"option 'w3a4' is not a uniform option"),
        ({"targets": [{"method": "uniform", "set": "4x0"}]},
         r"'finetune.targets\[0\]': .* is not valid; expected \{method, set: NxS, budget\}"),
        ({"targets": [{"method": "clado", "set": "four", "budget": "avg_bits-3"}]}, r"'finetune.targets\[0\]'"),
        ({"targets": "best"}, r"'finetune.targets': 'best' is not valid; expected `all`"),
        ({"targets": [{"method": "uniform", "option": "w2a4"}, {"method": "uniform", "option": "w2a4"}]},
         r"'finetune.targets'"),
        ({"targets": [{"method": "clado", "set": "4x0", "budget": "avg_bits-3"},
                      {"method": "clado", "set": "4x0", "budget": "avg_bits-3.0"}]}, r"listed twice"),
        ({"targets": "all", "world_size": 100}, r"'finetune.world_size': 100 processes need a batch_size"),
        ({"epochs": 0}, r"'finetune.epochs'"),
        ({"distill": 1.5}, r"'finetune.distill'"),
        ({"weight_init": "zeros"}, r"'finetune.weight_init'"),
        ({"target": []}, r"unknown config key\(s\) \['target'\] under 'finetune'"),
    ],
)  # fmt: skip
def test_bad_finetune_config_is_refused_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        _finetune(section)


def test_cuda_fine_tuning_needs_a_gpu_per_process(monkeypatch):
    import mpqflow.validation

    monkeypatch.setattr(mpqflow.validation, "cuda_available", lambda: True)
    monkeypatch.setattr(mpqflow.validation, "cuda_device_count", lambda: 1)
    raw = {**_default_raw(), "device": "cuda", "finetune": {"targets": "all", "world_size": 2}}
    with pytest.raises(ConfigError, match=r"'finetune.world_size': 2 fine-tuning processes with device 'cuda' need 2"):
        validate_config(raw)
    raw["finetune"]["targets"] = []  # no fine-tuning: its world_size asks for nothing
    validate_config(raw)


def test_the_docs_export_example_runs_and_matches_the_fine_tuned_logits(tiny_run, monkeypatch):
    """docs/training.md's example, on the tiny run's fine-tuned decision: the integer export rebuilt
    with load_export gives the fine-tuned model's logits bit for bit (both in eval mode)."""
    import re

    from conftest import REPO

    text = (REPO / "docs" / "training.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "load_export" in b)
    block = block.replace("results/digits_resnet20/finetuned/clado/set_4x0/avg_bits-2.5",
                          "results/tiny/finetuned/clado/set_2x0/avg_bits-4")  # fmt: skip
    block = block.replace('build_model("resnet20"', 'build_model("digits_cnn"')
    assert "results/tiny/finetuned" in block and "digits_cnn" in block, block
    monkeypatch.chdir(tiny_run)
    scope: dict = {}
    exec(compile(block, "docs/training.md", "exec"), scope)  # its own assert compares the logits
    assert not scope["exported"].training and not scope["finetuned"].training
