"""BatchNorm folding (quant.fold_bn, mpqflow/quant/fold.py): exact in FP, unfoldable patterns left and
named, recorded in the calibration and layer table (the other setting's calibration refused), and every
stage of the tiny workflow run with fold_bn true."""

import copy
import json
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from conftest import TINY, run_snakemake

from mpqflow.artifacts import load_calibration, load_layer_table
from mpqflow.config import Config, QuantConfig, validate_config
from mpqflow.context import load_context
from mpqflow.data import data_spec, load_split
from mpqflow.finetuned import load_finetuned
from mpqflow.io import file_sha256
from mpqflow.metrics import evaluate as evaluate_fp
from mpqflow.models import build_model, fresh_model, quantizable_layers
from mpqflow.quant import fold_batchnorm, fold_structure, foldable_batchnorms, load_export, read_export
from mpqflow.stages import calibrate, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_random_bn_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorms (a fresh one is the identity up to eps): random running statistics and
    affine parameters, so that folding changes every folded conv's weight and bias."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
    return net.eval()


@pytest.mark.parametrize(
    "arch, channels, size",
    [("digits_cnn", 1, 8), ("resnet20", 1, 8), ("torchvision:resnet18", 3, 32), ("torchvision:mobilenet_v2", 3, 32)],
)
def test_folding_is_exact_in_fp_and_keeps_the_layer_names(arch, channels, size):
    torch.manual_seed(0)
    net = _with_random_bn_statistics(build_model(arch, in_channels=channels, num_classes=10, image_size=size))
    x = torch.randn(8, channels, size, size)
    with torch.no_grad():
        reference = net(x)
    layers = quantizable_layers(net, x[:1])
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    folded = copy.deepcopy(net)
    pairs = fold_batchnorm(folded)
    assert len(pairs) == n_bn, "every BatchNorm of these models follows a conv used once"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert quantizable_layers(folded, x[:1]) == layers  # the layer table's names stay
    assert all(folded.get_submodule(c).bias is not None for c in pairs)
    assert not torch.equal(folded.get_submodule(next(iter(pairs))).weight, net.get_submodule(next(iter(pairs))).weight)
    with torch.no_grad():
        out = folded(x)
    scale = reference.abs().max().item()
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-5 * scale), (out - reference).abs().max()
    # fold_structure gives a fresh model the folded layout: the folded state_dict loads into it
    fresh = fold_structure(build_model(arch, in_channels=channels, num_classes=10, image_size=size), pairs).eval()
    fresh.load_state_dict(folded.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


class _Unfoldable(nn.Module):
    """One foldable pair (conv_ok -> bn_ok) and four BatchNorms that must stay."""

    def __init__(self):
        super().__init__()
        self.conv_ok, self.bn_ok = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.bn_after_relu = nn.BatchNorm2d(4)  # input is a ReLU's output, not a conv's
        self.conv_reused_out, self.bn_reused_out = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # conv output used twice
        self.conv_shared, self.bn_shared = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # conv called twice
        self.conv_batch_stats = nn.Conv2d(4, 4, 1)
        self.bn_batch_stats = nn.BatchNorm2d(4, track_running_stats=False)  # eval output depends on the batch

    def forward(self, x):
        x = self.bn_after_relu(F.relu(self.bn_ok(self.conv_ok(x))))
        y = self.conv_reused_out(x)
        x = self.bn_reused_out(y) + y
        x = self.bn_shared(self.conv_shared(x)) + self.conv_shared(x)
        return self.bn_batch_stats(self.conv_batch_stats(x))


def test_unfoldable_batchnorms_are_left_and_named(caplog):
    net = _with_random_bn_statistics(_Unfoldable())
    pairs, left = foldable_batchnorms(net)
    assert pairs == {"conv_ok": "bn_ok"}
    assert set(left) == {"bn_after_relu", "bn_reused_out", "bn_shared", "bn_batch_stats"}
    assert "not the output of a Conv2d" in left["bn_after_relu"]
    assert "also used by" in left["bn_reused_out"]
    assert "called 2 times" in left["bn_shared"]
    assert "running statistics" in left["bn_batch_stats"]
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        reference = net(x)
    with caplog.at_level(logging.WARNING, logger="mpqflow"):
        assert fold_batchnorm(net) == {"conv_ok": "bn_ok"}
    assert all(bn in caplog.text for bn in left)
    assert isinstance(net.bn_ok, nn.Identity) and isinstance(net.bn_shared, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.allclose(net(x), reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(_Unfoldable().train())


def test_a_model_that_does_not_trace_folds_nothing_and_says_why():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent control flow

    pairs, left = foldable_batchnorms(Branchy().eval())
    assert pairs == {} and "does not trace with torch.fx" in left["bn"]


RAW = {
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "models": {"m": {"arch": "digits_cnn", "dataset": {"name": "digits"}, "train": {"epochs": 1, "lr": 0.1}}},
    "quant": {"w_bits": [2, 8], "a_bits": [8], "calibration_samples": 64, "calibration_batch_size": 32},
    "sensitivity": {"batch_size": 16, "pool_batches": 2},
    "study": {"set_sizes": [1, 2], "sets_per_size": 1},
}


def _quant(cfg, fold_bn: bool) -> QuantConfig:
    return QuantConfig.from_dict({**cfg.quant.to_dict(), "fold_bn": fold_bn})


def test_calibration_records_fold_bn_and_the_other_setting_is_refused(tmp_path):
    cfg = Config.from_dict(validate_config(RAW))
    m, ckpt = cfg.models["m"], str(tmp_path / "model.pt")
    train.train_or_load(m, cfg.seed, cfg.evaluation, cfg.runtime, ckpt)
    for fold_bn in (False, True):
        d = tmp_path / f"fold_{fold_bn}"
        d.mkdir()
        calibrate.calibrate(m, _quant(cfg, fold_bn), cfg.seed, cfg.runtime, ckpt, str(d / "calibration.pt"),
                            str(d / "layers.json"), plan=cfg.sample_plan)  # fmt: skip
        table = load_layer_table(d / "layers.json")
        assert table.fold_bn is fold_bn
        assert table.folded_bn == ({"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"} if fold_bn else {})
        _, calibrated = load_calibration(d / "calibration.pt", file_sha256(ckpt), _quant(cfg, fold_bn).to_dict())
        assert calibrated == table
        ctx = load_context(m, _quant(cfg, fold_bn), cfg.seed, cfg.runtime, ckpt, str(d / "calibration.pt"))
        assert any(isinstance(x, nn.BatchNorm2d) for x in ctx.net.modules()) is not fold_bn
        with pytest.raises(ValueError, match=rf"calibration\.pt.*'fold_bn'.*{fold_bn!r} there, {not fold_bn!r} in"):
            load_context(m, _quant(cfg, not fold_bn), cfg.seed, cfg.runtime, ckpt, str(d / "calibration.pt"))


def _check_tiny_run(workdir, raw: dict, fold_bn: bool) -> None:
    """Calibrate, every sensitivity estimator (clado, mpqco, hawq), the LIMPQ indicators, solve,
    evaluate, the PTQ variants (naive, all = ACIQ + bit allocation + bias correction) and LSQ
    fine-tuning with its integer export ran on the folded (unfolded) model of a tiny run."""
    res = workdir / "results" / "tiny"
    table = load_layer_table(res / "layers.json")
    assert table.fold_bn is fold_bn
    assert table.folded_bn == ({"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"} if fold_bn else {})
    assert (res / "study.csv").is_file() and (res / "eval" / "uniform.csv").is_file()
    assert sorted(p.name for p in (res / "ptq").glob("*.json")) == ["all.json", "naive.json"]
    cfg = Config.from_dict(validate_config(raw))
    test = load_split(data_spec(cfg.models["tiny"], cfg.seed), "test")
    model_file = res / "finetuned" / "uniform" / "w2a8.pt"
    record = json.loads(model_file.with_suffix(".json").read_text())
    net = load_finetuned(model_file)  # the architecture folded from the file's own record
    assert any(isinstance(x, nn.BatchNorm2d) for x in net.modules()) is not fold_bn
    assert evaluate_fp(net, test, 256, torch.device("cpu"))["top1"] == pytest.approx(record["top1"])
    export = read_export(res / "finetuned" / "uniform" / "w2a8.export.pt")
    assert export["meta"]["folded_bn"] == table.folded_bn
    exported = load_export(fresh_model(cfg.models["tiny"], cfg.seed), export)
    assert evaluate_fp(exported, test, 256, torch.device("cpu"))["top1"] == pytest.approx(record["top1"])


def test_every_stage_of_the_tiny_workflow_runs_unfolded(tiny_run):
    """The tiny config does not fold (the schema's quant.fold_bn): the suite's shared run is unfolded."""
    raw = yaml.safe_load(TINY.read_text())
    assert "fold_bn" not in raw["quant"]
    _check_tiny_run(tiny_run, raw, False)


@pytest.mark.slow
def test_every_stage_of_the_tiny_workflow_runs_folded(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["quant"]["fold_bn"] = True
    config = tmp_path / "tiny_fold.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_snakemake(tmp_path, "--quiet", "rules", configfile=config)
    _check_tiny_run(tmp_path, raw, True)
