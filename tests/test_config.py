"""Config validation: defaults are filled in, and each kind of bad input names the key and what was expected."""

from pathlib import Path

import pytest
import yaml

from mpqflow.config import ConfigError, load_config, option_table, validate_config

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
    assert option_table(default) == [(8, 8), (8, 4), (4, 8), (4, 4), (2, 8), (2, 4)]
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
        (_with(solver={"node_limit": {"cplex": 5}}),
         "config key 'solver.node_limit': {'cplex': 5} is not valid; expected null, an integer >= 1, or a mapping"),
        ({"models": {"m": {"arch": "vgg", "dataset": {"name": "digits"}}}}, "config key 'models.m.arch': 'vgg' does not match"),
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
