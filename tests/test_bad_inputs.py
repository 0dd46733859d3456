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


def _with_limpq_file(raw: dict, path) -> dict:
    raw = copy.deepcopy(raw)
    raw["limpq"] = {**raw.get("limpq", {}), "indicators": str(path)}
    return raw


def _tiny_indicator_file(path, drop=None, rename=None, bits=None):
    """A LIMPQ pickle for the tiny model's candidates (traced on the meta device, as the check traces them)."""
    import pickle

    from mpqflow.config import Config
    from mpqflow.input_checks import meta_layer_table

    cfg = Config.from_dict(validate_config(RAW))
    table = meta_layer_table("tiny", cfg.models["tiny"], cfg.quant, 0)
    w_bits, a_bits = bits or cfg.quant.w_bits, cfg.quant.a_bits
    layers = [rename.get(l, l) if rename else l for l in table.candidates if l != drop]
    data = {
        "weight": {l: {str(b): 0.1 * (9 - b) for b in w_bits} for l in layers},
        "act": {l: {str(b): 0.1 * (9 - b) for b in a_bits} for l in layers},
        "layer_name": layers,
    }
    path.write_bytes(pickle.dumps(data))
    return table


def test_a_well_formed_indicator_file_passes_the_check(tmp_path):
    from mpqflow.input_checks import check_named_files

    _tiny_indicator_file(tmp_path / "ok.pkl")
    check_named_files(validate_config(_with_limpq_file(RAW, tmp_path / "ok.pkl")))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("not_a_pickle", "not a LIMPQ indicator pickle"),
        ("empty", "not a LIMPQ indicator pickle (EOFError"),
        ("empty_dict", "expected a dict with keys 'weight', 'act'"),
        ("wrong_layer_names", "are not Conv2d/Linear layers of the model"),
        ("missing_layer", "has no indicators of layer"),
        ("wrong_bits", "has bit-widths [3, 5], quant.w_bits / a_bits give [2, 8]"),
    ],
)
def test_a_bad_indicator_file_is_refused_before_any_job(tmp_path, case, expected):
    """limpq.indicators is read as the limpq_indicators job reads it, against the layer table traced on
    the meta device, before any job: the key, the file and the fault are named, nothing is written."""
    import pickle

    path = tmp_path / f"{case}.pkl"
    if case == "not_a_pickle":
        path.write_text("layer,bits,step\nconv1,8,0.1\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "empty_dict":
        path.write_bytes(pickle.dumps({}))
    else:
        table = _tiny_indicator_file(path, drop=None, bits=(5, 3) if case == "wrong_bits" else None)
        if case == "wrong_layer_names":
            _tiny_indicator_file(path, rename={table.candidates[0]: "features.0"})
        elif case == "missing_layer":
            _tiny_indicator_file(path, drop=table.candidates[-1])
    raw = _with_limpq_file(RAW, path)
    if case in ("not_a_pickle", "wrong_bits"):  # through the workflow (two cases keep the suite short)
        out = _refused_before_any_job(tmp_path, raw, "config key 'limpq.indicators'", str(path))
    else:  # the check the Snakefile runs right after validation, called as it calls it
        from mpqflow.input_checks import check_named_files

        with pytest.raises(ConfigError) as err:
            check_named_files(validate_config(raw))
        out = str(err.value)
        assert "config key 'limpq.indicators'" in out and str(path) in out
    assert expected in out, out[-3000:]


def test_a_cifar_root_without_its_batches_is_refused_before_any_job(tmp_path):
    raw = copy.deepcopy(RAW)
    root = tmp_path / "cifar"
    (root / "cifar10").mkdir(parents=True)  # a plausible mistake: the torchvision folder's parent or a sibling
    raw["models"]["tiny"]["dataset"] = {"name": "cifar10", "root": str(root)}
    out = _refused_before_any_job(tmp_path, raw, "config key 'models.tiny.dataset.root'", str(root))
    assert "has no cifar-10-batches-py/ folder" in out and "data_batch_1" in out
    (root / "cifar-10-batches-py").mkdir()
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"lacks data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch"):
        validate_config(raw)


def test_weights_of_another_architecture_are_refused_before_any_job(tmp_path):
    """A weights file is compared, tensor by tensor, with the configured architecture built on the meta
    device: the message says it is another architecture instead of hinting at the class count."""
    from mpqflow.models import build_model

    weights = tmp_path / "resnet20.pt"
    torch.save(build_model("resnet20", in_channels=1, num_classes=10).state_dict(), weights)
    raw = copy.deepcopy(RAW)
    raw["models"]["tiny"]["weights"] = str(weights)
    out = _refused_before_any_job(tmp_path, raw, "config key 'models.tiny.weights'", str(weights))
    assert "a checkpoint of another architecture" in out and "num_classes" not in out, out[-3000:]


def test_weights_for_another_class_count_name_the_key_that_fixes_them(tmp_path):
    from mpqflow.config import Config
    from mpqflow.input_checks import check_named_files
    from mpqflow.models import fresh_model

    cfg = Config.from_dict(validate_config(RAW))
    net = fresh_model(cfg.models["tiny"], 0)
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    raw = copy.deepcopy(RAW)
    raw["models"]["tiny"]["weights"] = str(weights)
    check_named_files(validate_config(raw))  # its own weights fit
    raw["models"]["tiny"]["num_classes"] = 12
    with pytest.raises(ConfigError, match=r"'models.tiny.weights'.*10 outputs where the model has 12.*num_classes: 10"):
        check_named_files(validate_config(raw))


def test_gradquant_processes_beyond_the_cores_are_refused_when_it_is_a_target(tmp_path):
    """gradquant.world_size counts only for runs whose targets include the study (it is not in `all`)."""
    raw = copy.deepcopy(RAW)
    too_many = local_cores() + 1
    raw["gradquant"] = {**raw.get("gradquant", {}), "world_size": too_many}
    raw["models"]["tiny"]["train"] = {**raw["models"]["tiny"].get("train", {}), "batch_size": 64}
    cfg = validate_config(raw)
    check_local_cores(cfg)  # the default targets: not checked
    with pytest.raises(ConfigError, match=rf"'gradquant.world_size': {too_many} data-parallel processes"):
        check_local_cores(cfg, gradquant=True)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = run_snakemake(tmp_path, "gradquant", configfile=config, check=False, timeout=300)
    assert proc.returncode != 0 and "gradquant.world_size" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
