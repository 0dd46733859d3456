"""Config validation: defaults are filled in, and each kind of bad input names the key and what was expected."""

from pathlib import Path

import pytest
import yaml

import mpqflow.config_checks
import mpqflow.validation
from mpqflow.config import ConfigError, load_config, validate_config
from mpqflow.names import option_table
from mpqflow.validation import canonical_budget, cuda_available, train_samples

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {"models": {"m": {"arch": "resnet20", "dataset": {"name": "digits"}}}}


def _with(**sections):
    cfg = yaml.safe_load(yaml.safe_dump(MINIMAL))
    cfg.update(sections)
    return cfg


def test_defaults_filled_and_default_config_valid():
    cfg = validate_config(MINIMAL)
    assert cfg["quant"]["w_bits"] == [2, 4, 8]
    assert cfg["quant"]["weight"]["granularity"] == "per_channel"
    assert cfg["models"]["m"]["train"]["epochs"] == 60
    assert "quant" not in MINIMAL  # the caller's dict is not modified
    default = load_config(REPO / "config.yaml")
    assert option_table(default["quant"]["w_bits"], default["quant"]["a_bits"]) == [
        (8, 8),
        (8, 4),
        (4, 8),
        (4, 4),
        (2, 8),
        (2, 4),
    ]
    assert load_config(REPO / "tests/configs/tiny.yaml")["models"]["tiny"]["arch"] == "digits_cnn"


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (_with(colour="red"), "unknown config key(s) ['colour']"),
        (_with(quant={"w_bits": [2, 17]}), "config key 'quant.w_bits[1]': 17 is greater than the maximum of 16"),
        (_with(quant={"a_bits": [0]}), "config key 'quant.a_bits[0]': 0 is less than the minimum of 1"),
        (_with(seed="zero"), "config key 'seed': 'zero' is not of type 'integer'"),
        (_with(quant={"weight": {"observer": "max"}}), "config key 'quant.weight.observer': 'max' is not one of"),
        (_with(quant={"weight": {"gran": "x"}}), "unknown config key(s) ['gran'] under 'quant.weight'"),
        (_with(sensitivity={"hawq_tol": 1e-3}), "hawq_tol was replaced by hawq_rel_se"),
        (_with(sensitivity={"hawq_rel_se": 0}), "config key 'sensitivity.hawq_rel_se': 0 is less than or equal"),
        (
            _with(solver={"node_limit": {"cplex": 5}}),
            "config key 'solver.node_limit': {'cplex': 5} is not valid; expected null, an integer >= 1, or a mapping",
        ),
        (
            {"models": {"m": {"arch": "vgg", "dataset": {"name": "digits"}}}},
            (
                "config key 'models.m.arch': 'vgg' is not a known architecture; expected one of digits_cnn, resnet20, "
                "resnet32, resnet56, or torchvision:<name>"
            ),
        ),
        ({}, "'models' is a required property"),
    ],
)
def test_schema_errors_name_the_key(cfg, expected):
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert expected in str(err.value)


def test_missing_dataset_path_and_weights_file(tmp_path):
    cifar = {"models": {"c": {"arch": "resnet20", "dataset": {"name": "cifar10", "root": str(tmp_path / "nope")}}}}
    with pytest.raises(ConfigError, match=r"models\.c\.dataset\.root': '.*nope' is not an existing directory"):
        validate_config(cifar)
    no_root = {"models": {"c": {"arch": "resnet20", "dataset": {"name": "cifar10"}}}}
    with pytest.raises(ConfigError, match=r"models\.c\.dataset\.root': dataset 'cifar10' needs a local path"):
        validate_config(no_root)
    weights = {"models": {"w": {"arch": "resnet20", "weights": str(tmp_path / "w.pt"), "dataset": {"name": "digits"}}}}
    with pytest.raises(ConfigError, match=r"models\.w\.weights': '.*w\.pt' is not an existing file"):
        validate_config(weights)


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models: {m: {arch: resnet20, dataset: {name: digits}}}\nquant: {w_bits: [99]}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: config key 'quant\.w_bits\[0\]'"):
        load_config(path)


def test_key_order_does_not_change_the_validated_config():
    """Rule params come from the validated config: a YAML with its keys in another order must give
    the same params (the same repr, which Snakemake's params trigger compares), lists untouched."""
    raw = yaml.safe_load((REPO / "config.yaml").read_text())

    def reverse(obj):
        return {k: reverse(obj[k]) for k in reversed(list(obj))} if isinstance(obj, dict) else obj

    assert list(reverse(raw)) != list(raw)
    a, b = validate_config(raw), validate_config(reverse(raw))
    assert repr(a) == repr(b)
    assert a["budgets"] == raw["budgets"]  # list order is meaningful and kept


# Issue 10, item 7: single mistakes in a copy of config.yaml fail at validation, before any job runs,
# naming the key, the bad value and what is allowed in words.


def _fails(cfg, expected, **kwargs):
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, **kwargs)
    assert expected in str(err.value), str(err.value)
    return str(err.value)


def test_weights_file_that_is_not_a_checkpoint(tmp_path):
    """(1) A README as weights fails at validation (torch-free sniffing), not with torch's UnpicklingError."""
    readme = tmp_path / "README.md"
    readme.write_text("# my model\n")
    cfg = {"models": {"m": {"arch": "resnet20", "weights": str(readme), "dataset": {"name": "digits"}}}}
    _fails(
        cfg,
        f"config key 'models.m.weights': {str(readme)!r} is not a PyTorch checkpoint (expected a file "
        "written by torch.save: a state_dict or {'state_dict': ...})",
    )
    # What torch.save writes passes: a zip with <name>/data.pkl, or a legacy pickle (first byte 0x80).
    import zipfile

    new = tmp_path / "new.pt"
    with zipfile.ZipFile(new, "w") as z:
        z.writestr("new/data.pkl", b"\x80\x02}q\x00.")
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x02\x8a\x0alz\xfc\x9cF\xf9 j\xa8P\x19.")
    npz = tmp_path / "w.npz"
    with zipfile.ZipFile(npz, "w") as z:
        z.writestr("w.npy", b"\x93NUMPY")
    for path, ok in ((new, True), (legacy, True), (npz, False), (tmp_path / "empty.pt", False)):
        path.touch()
        cfg["models"]["m"]["weights"] = str(path)
        if ok:
            validate_config(cfg)
        else:
            _fails(cfg, "is not a PyTorch checkpoint")


def test_load_state_dict_refuses_non_checkpoints_without_unsafe_advice(tmp_path):
    torch = pytest.importorskip("torch")
    from mpqflow.checkpoints import load_state_dict, looks_like_torch_save

    sd = {"w": torch.ones(2), "b": torch.zeros(1)}
    for i, (obj, legacy) in enumerate([(sd, False), ({"state_dict": sd, "epoch": 3}, False), (sd, True)]):
        path = tmp_path / f"ok{i}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        assert looks_like_torch_save(path)
        assert sorted(load_state_dict(path)) == ["b", "w"]
    readme = tmp_path / "README.md"
    readme.write_text("# my model\n")
    torch.save({"w": torch.ones(2), "args": __import__("argparse").Namespace(lr=0.1)}, tmp_path / "obj.pt")
    torch.save({"model": sd, "epoch": 3}, tmp_path / "nested.pt")
    for name, expected in [
        ("README.md", "is not a PyTorch checkpoint of tensors (its bytes are neither a zip archive nor a pickle)"),
        ("obj.pt", "(it holds an object of type argparse.Namespace, not only tensors)"),
        ("nested.pt", "holds a dict that is not a state_dict: key 'model' is a dict, not a tensor"),
    ]:
        with pytest.raises(ValueError) as err:
            load_state_dict(tmp_path / name, what="model weights")
        msg = str(err.value)
        assert f"model weights file {str(tmp_path / name)!r}" in msg and expected in msg, msg
        assert "weights_only" not in msg, msg
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "missing.pt")


def test_device_cuda_without_cuda(monkeypatch):
    """(2) device: cuda on a machine without CUDA fails at validation, unless jobs run elsewhere."""
    monkeypatch.setattr(mpqflow.validation, "cuda_available", lambda: False)
    cfg = _with(device="cuda")
    _fails(cfg, "config key 'device': 'cuda' but this machine has no CUDA device")
    _fails(cfg, "use 'auto' (CUDA when there is one, else the CPU) or 'cpu'")
    assert validate_config(cfg, local=False)["device"] == "cuda"  # cluster: the submit host may have no GPU
    assert validate_config(_with(device="auto"))["device"] == "auto"
    monkeypatch.setattr(mpqflow.validation, "cuda_available", lambda: True)
    assert validate_config(cfg)["device"] == "cuda"


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_cuda_visible_devices_hides_every_gpu(monkeypatch, hidden):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    assert cuda_available() is False


@pytest.mark.parametrize(
    "sections, expected",
    [
        (
            {"sensitivity": {"pool_batches": 100}},
            (
                "quant.calibration_samples (256) + sensitivity.pool_batches (100) × sensitivity.batch_size (64) = 6656 "
                "exceeds the 1347 training samples of digits (test_fraction 0.25)"
            ),
        ),
        (
            {"quant": {"calibration_samples": 2000}},
            (
                "quant.calibration_samples (2000) + sensitivity.pool_batches (8) × sensitivity.batch_size (64) = 2512 "
                "exceeds the 1347 training samples"
            ),
        ),
    ],
)
def test_calibration_and_pool_exceed_the_training_split(sections, expected):
    """(3) The training split must hold the calibration samples and the pool."""
    msg = _fails(_with(**sections), expected)
    assert (
        "config keys 'quant.calibration_samples', 'sensitivity.pool_batches', 'sensitivity.batch_size' (model 'm')"
        in msg
    )
    # Exactly the training split fits; one sample more does not.
    assert validate_config(_with(quant={"calibration_samples": 1347 - 8 * 64}))
    _fails(_with(quant={"calibration_samples": 1347 - 8 * 64 + 1}), "= 1348 exceeds the 1347 training samples")


def test_training_split_sizes_match_sklearn_and_cifar(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    for tf in (0.1, 0.25, 0.3, 0.5, 0.9):
        x_tr, _, _, _ = train_test_split(x, y, test_size=tf, random_state=0, stratify=y)
        assert train_samples({"name": "digits", "test_fraction": tf})[0] == len(x_tr)
    (tmp_path / "cifar-100-python").mkdir()
    for name in ("train", "test"):  # the layout check_paths asks for (the batches are read in the first job)
        (tmp_path / "cifar-100-python" / name).write_bytes(b"")
    cifar = {
        "models": {"c": {"arch": "resnet20", "dataset": {"name": "cifar100", "root": str(tmp_path)}}},
        "sensitivity": {"pool_batches": 800},
    }
    _fails(cifar, "= 51456 exceeds the 50000 training samples of cifar100")
    imagenet = {
        "models": {
            "i": {
                "arch": "torchvision:resnet18",
                "weights": None,
                "dataset": {"name": "imagenet", "root": str(tmp_path)},
            }
        }
    }
    assert train_samples(imagenet["models"]["i"]["dataset"]) is None  # unknown here: the first job checks


@pytest.mark.parametrize(
    "options, expected",
    [
        (
            ["w0a8"],
            (
                "config key 'ptq.options[0]': 'w0a8' is not a PTQ option; expected wWaA with weight bits W and "
                "activation bits A in 1..16, e.g. w4a8"
            ),
        ),
        (["w4a8", "w17a8"], "config key 'ptq.options[1]': 'w17a8' has 17 weight bits; expected wWaA"),
        (["w4a99"], "config key 'ptq.options[0]': 'w4a99' has 99 activation bits"),
        (["4a8"], "config key 'ptq.options[0]': '4a8' is not a PTQ option"),
    ],
)
def test_ptq_options(options, expected):
    """(4) Each PTQ option is wWaA with bits in 1..16, named by its index."""
    _fails(_with(ptq={"options": options}), expected)


@pytest.mark.parametrize(
    "sections, expected",
    [
        (
            {"budgets": ["avg_bits-4", "size_mb-0"]},
            "config key 'budgets[1]': 'size_mb-0' has value 0; a budget's value must be greater than 0",
        ),
        ({"budgets": ["bitops_rel-0.0"]}, "config key 'budgets[0]': 'bitops_rel-0.0' has value 0.0"),
        (
            {"budgets": ["avg_bits-1.5"]},
            (
                "config key 'budgets[0]': 'avg_bits-1.5' cannot be met: the average weight bits are at least 2 (a "
                "compression ratio of at most 16 against FP32), the smallest of quant.w_bits [2, 4, 8]"
            ),
        ),
        (
            {"quant": {"w_bits": [4, 8]}},  # the default budgets with a narrower w_bits: say they are the default
            "'avg_bits-3' cannot be met: the average weight bits are at least 4",
        ),
    ],
)
def test_budget_zero_or_certainly_infeasible(sections, expected):
    """(5) A budget must be > 0; avg_bits below every reachable average fails."""
    msg = _fails(_with(**sections), expected)
    if "budgets" not in sections:
        assert "budgets is not set, so its default" in msg
    # Feasible edge cases pass: avg_bits at the smallest w_bits, a relative budget above 1, and a lower
    # average where the fixed first/last layers have fewer bits than every w_bits.
    assert validate_config(_with(budgets=["avg_bits-2", "size_rel-1.5"]))
    assert validate_config(_with(budgets=["avg_bits-1.5"], quant={"w_bits": [2, 4], "fixed_bits": 1}))
    _fails(_with(budgets=["avg_bits-1.5"], quant={"fix_first_last": False, "fixed_bits": 1}), "at least 2")


def test_equivalent_budgets_are_one_budget():
    """(6) avg_bits-3 and avg_bits-3.0 are one budget: canonical names, first order kept, duplicates dropped."""
    cfg = validate_config(
        _with(
            budgets=["avg_bits-3.0", "size_mb-0.120", "avg_bits-3", "avg_bits-03.00", "bitops_rel-0.25", "avg_bits-3.0"]
        )
    )
    assert cfg["budgets"] == ["avg_bits-3", "size_mb-0.12", "bitops_rel-0.25"]
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    assert load_config(REPO / "config.yaml")["budgets"] == raw["budgets"]  # the default config is canonical


def test_canonical_budget_agrees_with_budget_name():
    """validation.py formats budgets without importing mpqflow.optimize; the names must agree with Budget's."""
    import numpy as np

    from mpqflow.optimize.budgets import Budget

    names = [
        "avg_bits-3",
        "avg_bits-3.0",
        "avg_bits-2.50",
        "size_mb-0.120",
        "size_mb-0.00001",
        "size_rel-1",
        "gbitops-1234567.125",
        "bitops_rel-0.1",
        "gbitops-10000000000000000",
        "avg_bits-0.30000000000000004",
    ]
    for name in names:
        assert canonical_budget(name) == Budget.parse(name).name, name
    for v in np.random.default_rng(0).uniform(0, 1e3, 200).tolist() + [1e-7, 1e22, 0.1 + 0.2]:
        assert mpqflow.config_checks._fmt_number(v) == np.format_float_positional(v, trim="-"), v


def test_set_size_larger_than_the_pool():
    """(7) A set size above pool_batches fails at validation, not as an InputFunctionException."""
    _fails(
        _with(study={"set_sizes": [1, 16]}, sensitivity={"pool_batches": 8}),
        "config key 'study.set_sizes[1]': set size 16 exceeds sensitivity.pool_batches (8)",
    )
    assert validate_config(_with(study={"set_sizes": [1, 8]}, sensitivity={"pool_batches": 8}))


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (
            {"models": {"m": {"arch": "vgg", "dataset": {"name": "digits"}}}},
            (
                "config key 'models.m.arch': 'vgg' is not a known architecture; expected one of digits_cnn, resnet20, "
                "resnet32, resnet56, or torchvision:<name>"
            ),
        ),
        (
            _with(budgets=["bits-3"]),
            (
                "config key 'budgets[0]': 'bits-3' is not a budget; expected kind-value with kind one of avg_bits, "
                "size_mb, size_rel, gbitops, bitops_rel, cr, latency_ms, latency_rel and a number, e.g. avg_bits-3.5"
            ),
        ),
        (_with(budgets=["avg_bits-3", "avg_bits-x"]), "config key 'budgets[1]': 'avg_bits-x' is not a budget"),
        (
            {"models": {"my-model": {"arch": "resnet20", "dataset": {"name": "digits"}}}},
            "config key 'models': 'my-model' is not a model name; expected letters, digits and underscores",
        ),
    ],
)
def test_unknown_arch_or_budget_kind_in_words(cfg, expected):
    """(8) No regular expressions in messages: the allowed values in words."""
    msg = _fails(cfg, expected)
    assert "^" not in msg and "does not match" not in msg


@pytest.mark.parametrize(
    "text, where",
    [
        (
            "models: {m: {arch: resnet20, dataset: {name: digits}}}\nquant:\n  w_bits: [2, 4, 8\n  a_bits: [4, 8]\n",
            ":4:9: not valid YAML: expected ',' or ']', but got ':' "
            "(while parsing a flow sequence at line 3, column 11)",
        ),
        ("seed: 0\n\tdevice: cpu\n", ":2:1: not valid YAML: found character '\\t' that cannot start any token"),
    ],
)
def test_yaml_syntax_error_names_file_and_line(tmp_path, text, where):
    """(9) load_config names the file, the line and the column of a YAML syntax error."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}{where}"), str(err.value)


def test_validation_stays_torch_free():
    """The Snakefile validates while building the DAG: no torch (7 s) and no numpy imported for it."""
    import subprocess
    import sys

    code = (
        "import sys; from mpqflow.config import load_config; load_config('config.yaml'); "
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("ptq", [None, {"variants": []}])
def test_ptq_study_can_be_turned_off(ptq):
    cfg = validate_config({**MINIMAL, "ptq": ptq})
    assert cfg["ptq"]["variants"] == [] and cfg["ptq"]["options"]  # options keep their default


def test_imagenet_folder_needs_train_and_val_and_enough_classes(tmp_path):
    """A torchvision model on an ImageNet-style folder may be trained (weights: null); the folder
    needs train/ and val/, and an explicit num_classes must cover its class folders."""
    cfg = {"models": {"i": {"arch": "torchvision:resnet18", "dataset": {"name": "imagenet", "root": str(tmp_path)}}}}
    with pytest.raises(ConfigError, match=r"has no train/ folder; an ImageNet-style root holds train/<class>/\*"):
        validate_config(cfg)
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (tmp_path / split / c).mkdir(parents=True)
    assert validate_config(cfg)["models"]["i"]["num_classes"] is None  # trained, classes from the folder
    cfg["models"]["i"]["num_classes"] = 2
    with pytest.raises(ConfigError, match=r"'models.i.num_classes': 2 is fewer than the 3 classes of dataset"):
        validate_config(cfg)
    digits = {"models": {"d": {"arch": "resnet20", "dataset": {"name": "digits"}, "num_classes": 9}}}
    with pytest.raises(ConfigError, match=r"'models.d.num_classes': 9 is fewer than the 10 classes"):
        validate_config(digits)
