"""Inputs that were late, silent or unnamed (issue 24): each now stops before any job, naming the key,
the value and what was expected, or names the damaged file and the remedy."""

import copy

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, run_snakemake

from mpqflow.artifacts import load_batch_file, save_batch_file
from mpqflow.config import ConfigError
from mpqflow.validation import check_local_cores, local_cores, validate_config

RAW = yaml.safe_load(TINY.read_text())


def _refused_before_any_job(tmp_path, raw: dict, *expected: str) -> str:
    """The workflow on `raw` exits non-zero naming every `expected` string, and writes no result."""
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = run_snakemake(tmp_path, configfile=config, check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    for text in expected:
        assert text in out, out[-3000:]
    assert not (tmp_path / "results").exists()
    return out


def test_duplicated_finetune_target_is_named(tmp_path):
    raw = copy.deepcopy(RAW)
    target = {"method": "clado", "set": "2x0", "budget": "avg_bits-4"}
    raw["finetune"] = {**raw.get("finetune", {}), "targets": [target, dict(target)]}
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    message = str(err.value)
    assert "'finetune.targets'" in message and "listed twice" in message and "'clado'" in message, message
    _refused_before_any_job(tmp_path, raw, "finetune.targets", "listed twice")


def test_hawq_max_probes_below_min_probes_is_refused(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["sensitivity"] = {**raw.get("sensitivity", {}), "hawq_max_probes": 10, "hawq_min_probes": 30}
    with pytest.raises(ConfigError, match=r"'sensitivity.hawq_max_probes': 10 is below sensitivity.hawq_min_probes"):
        validate_config(raw)
    _refused_before_any_job(tmp_path, raw, "sensitivity.hawq_max_probes", "10", "hawq_min_probes (30)")


def test_more_processes_than_cores_is_refused_before_any_job(tmp_path):
    """world_size above the machine's cores (a CPU run here) stops at the start, naming the key; on a
    GPU machine, or with the processes within the cores, it is fine."""
    raw = copy.deepcopy(RAW)
    cfg = validate_config(raw)
    check_local_cores(cfg, cores=max(cfg["models"]["tiny"]["train"]["world_size"], 2))  # within: fine
    too_many = local_cores() + 1
    raw["models"]["tiny"]["train"] = {**raw["models"]["tiny"].get("train", {}), "world_size": too_many,
                                   "batch_size": 64}  # fmt: skip
    cfg = validate_config(raw)
    with pytest.raises(ConfigError, match=rf"'models.tiny.train.world_size': {too_many} data-parallel processes"):
        check_local_cores(cfg)
    check_local_cores({**cfg, "device": "cuda"})
    _refused_before_any_job(tmp_path, raw, "models.tiny.train.world_size", f"{too_many} data-parallel processes")


def test_truncated_batch_file_is_named_with_the_remedy(tmp_path):
    path = tmp_path / "batch_0.npz"
    meta = {"format": 3, "estimator": "mpqco", "layers": ["a"], "options": np.array([[8, 8]]), "quant": "{}",
            "checkpoint_sha256": "x", "settings": "{}"}  # fmt: skip
    save_batch_file(path, {"sq_sum": np.ones(1), "count": np.int64(1)}, meta)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"batch_0\.npz: not a readable \.npz file .*--forcerun"):
        load_batch_file(path)


def test_load_export_returns_an_eval_mode_model_with_the_fine_tuned_logits(tmp_path):
    """The docs' export example: the rebuilt model is in eval mode, so its logits are the fine-tuned
    model's and a forward leaves the BatchNorm statistics alone."""
    from mpqflow.models import build_model
    from mpqflow.quant import export_integer, init_activations, load_export, prepare_lsq

    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1, num_classes=10, image_size=8)
    x = torch.randn(16, 1, 8, 8)
    net(x)  # some BatchNorm statistics
    layers = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    lsq = prepare_lsq(net, {n: (4, 8) for n in layers}, weight_init="limpq", per_channel=False)
    init_activations(lsq, [x])
    lsq.eval()
    with torch.no_grad():
        want = lsq(x)
    state, _ = export_integer(lsq)
    rebuilt = load_export(build_model("resnet20", in_channels=1, num_classes=10, image_size=8), state)
    assert not rebuilt.training
    before = {k: v.clone() for k, v in rebuilt.state_dict().items() if "running" in k}
    with torch.no_grad():
        got = rebuilt(x)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in rebuilt.state_dict().items() if k in before)
