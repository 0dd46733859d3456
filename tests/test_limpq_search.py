"""LIMPQ's search half: the cr budget, floored BitOPs, the outlier rule, the objective, and the
import of LIMPQ-format indicator pickles onto torchvision layer names."""

import pickle

import numpy as np
import pytest
import torch

from mpqflow.config import QuantConfig, validate_config
from mpqflow.config_checks import ConfigError
from mpqflow.context import layer_table
from mpqflow.indicators import (
    limpq_allowed,
    limpq_forbidden_bits,
    limpq_linear,
    read_limpq_pickle,
    write_limpq_pickle,
)
from mpqflow.layers import LayerTable
from mpqflow.methods import method_allowed, method_objective
from mpqflow.models import build_model
from mpqflow.optimize import Budget, InfeasibleBudget, build_problem, solve


def _quant(w_bits, a_bits):
    return QuantConfig.from_dict(
        {
            "weight": {}, "activation": {}, "w_bits": list(w_bits), "a_bits": list(a_bits), "fixed_bits": 8,
            "fix_first_last": True, "calibration_samples": 64, "calibration_batch_size": 64, "fold_bn": False,
        }
    )  # fmt: skip


def _table(options=((4, 8), (2, 8))):
    """conv0 fixed at W8A8, two candidates, an unreached 100-weight layer (FP32)."""
    return LayerTable(
        layers=("conv0", "a", "b"),
        candidates=("a", "b"),
        fixed={"conv0": (8, 8)},
        options=tuple(options),
        numel={"conv0": 50, "a": 1000, "b": 3000, "emb": 100},
        macs={"conv0": 500, "a": 4000, "b": 9000},
        unreached=("emb",),
    )


def test_cr_budget_against_a_hand_count():
    table = _table()
    p = build_problem(table, linear=np.array([0.0, 1.0, 0.0, 5.0]))  # prefer a at 2 bits, b at 4
    fp32_bits = 32 * (50 + 1000 + 3000 + 100)  # every weight at 32 bits
    b = Budget.parse("cr-5")
    assert b.is_size and b.cap(p) == pytest.approx(fp32_bits / 5)
    # the model at a=W4, b=W4: 50*8 + 1000*4 + 3000*4 + 100*32 bits
    x = p.x_of([0, 2])
    assert p.total_size_bits(x) == 50 * 8 + 16000 + 3200
    assert b.in_unit(p, p.total_size_bits(x)) == pytest.approx(fp32_bits / 19600)
    # cr-7 allows 18971 bits: a at 2 bits, b at 4 (17600 bits) fits, the all-4-bit model does not
    sol = solve(p, "cr-7", backend="highs")
    assert list(sol.choice) == [1, 2]
    assert p.total_size_bits(sol.x) <= fp32_bits / 7
    assert Budget.parse("cr-7").to_caps(p)[0] == pytest.approx(fp32_bits / 7)
    # cr-r is avg_bits-(32/r): the same cap
    assert Budget.parse("cr-8").cap(p) == pytest.approx(Budget("avg_bits", 4.0).cap(p))
    with pytest.raises(
        InfeasibleBudget, match="cr-12 is infeasible: the highest achievable compression ratio is 11.448"
    ):
        Budget.parse("cr-12").to_caps(p)  # smallest model: 400 + 2000 + 6000 + 3200 bits = ratio 11.448


def test_config_refuses_a_cr_no_bit_width_reaches(tmp_path):
    from mpqflow.config_checks import check_budgets

    cfg = {"quant": {"w_bits": [2, 4], "fixed_bits": 8, "fix_first_last": True}, "budgets": ["cr-12.2", "cr-16"]}
    assert check_budgets(cfg) == ["cr-12.2", "cr-16"]
    with pytest.raises(ConfigError, match=r"budgets\[1\].*'cr-17'.*at least 2 \(a compression ratio of at most 16"):
        check_budgets({**cfg, "budgets": ["cr-12.2", "cr-17"]})


def test_resnet50_bitops_use_floored_output_sizes():
    """MACs come from the shapes the layers produce: conv1 (7x7, stride 2, 224 -> 112) and the
    stride-2 3x3 of layer2.0 (56 -> 28) by hand; LIMPQ's unfloored (H+2p-k)/s+1 = 28.5 would
    count (28.5/28)^2 = 1.036 times as many."""
    net = build_model("torchvision:resnet50", num_classes=1000)
    table = layer_table(net, torch.zeros(1, 3, 224, 224), _quant([6, 5, 4, 3, 2], [6, 5, 4, 3, 2]))
    assert table.macs["conv1"] == 3 * 7 * 7 * 64 * 112 * 112
    assert table.macs["layer2.0.conv2"] == 128 * 3 * 3 * 128 * 28 * 28
    assert table.macs["layer2.0.downsample.0"] == 256 * 512 * 28 * 28
    assert table.macs["fc"] == 2048 * 1000
    limpq_count = 128 * 3 * 3 * 128 * int(((56 + 2 - 2 - 1) / 2 + 1) ** 2)
    assert limpq_count / table.macs["layer2.0.conv2"] == pytest.approx(1.036, abs=1e-3)
    assert len(table.candidates) == 52 and table.fixed == {"conv1": (8, 8), "fc": (8, 8)}


def test_outlier_rule_forbids_a_lower_bit_below_the_next_higher():
    s = np.array([[0.1, 0.2, 0.4, 0.8], [0.1, 0.05, 0.4, 0.3], [0.3, 0.2, 0.1, 0.05]])  # bits 8, 4, 3, 2
    assert limpq_forbidden_bits(s).tolist() == [
        [False, False, False, False],
        [False, True, False, True],  # 4 below 8; 2 below 3 (3 compares with the trained 4, not the marked)
        [False, True, True, True],  # decreasing everywhere: only the highest is left
    ]


def _payload(w, a, w_bits, a_bits):
    return {"w_indicator": np.array(w, float), "a_indicator": np.array(a, float), "w_bits": np.array(w_bits),
            "a_bits": np.array(a_bits), "count": np.int64(0)}  # fmt: skip


def test_objective_and_allowed_options_on_the_option_table():
    table = _table(options=((4, 8), (4, 4), (2, 8), (2, 4)))
    payload = _payload([[0.1, 0.3], [0.2, 0.1]], [[0.5, 0.9], [0.5, 0.7]], [4, 2], [8, 4])
    lin = limpq_linear(payload, table, alpha=2.0)  # 2 (Δs_a + 2 Δs_w)
    np.testing.assert_allclose(lin, 2 * np.array([0, 0.4, 0.4, 0.8, 0, 0.2, -0.2, 0.0]), atol=1e-12)
    allowed = limpq_allowed(payload, table)
    assert allowed.tolist() == [True, True, True, True, True, True, False, False]  # b's 2-bit weights
    assert method_allowed("limpq", payload, table).tolist() == allowed.tolist()
    assert method_allowed("mpqco", {}, table) is None
    G, linear = method_objective("limpq", payload, table, {"alpha": 1.0})
    assert G is None and linear[1] == pytest.approx(2 * (0.4 + 0.0))
    # the forbidden option would win without the rule; the problem leaves it out
    p = build_problem(table, linear=lin, allowed=allowed)
    assert p.n == 6 and p.options[-1] == (4, 4)
    sol = solve(p, "avg_bits-100", backend="highs")
    assert [p.options[i] for i in sol.choice] == [(4, 8), (4, 8)]


def test_a_layer_left_without_options_is_named():
    table = _table(options=((4, 4), (2, 8)))  # no (highest w, highest a) pair
    payload = _payload([[0.1, 0.3], [0.2, 0.1]], [[0.5, 0.9], [0.9, 0.5]], [4, 2], [8, 4])
    with pytest.raises(ValueError, match=r"forbids every option of layers \['b'\]"):
        limpq_allowed(payload, table)


@pytest.fixture(scope="module")
def resnet18_table():
    net = build_model("torchvision:resnet18", num_classes=1000)
    return layer_table(net, torch.zeros(1, 3, 64, 64), _quant([6, 5, 4, 3, 2], [6, 5, 4, 3, 2]))


def _limpq_file(path, table, prefix="module.", drop=None, bits=(6, 5, 4, 3, 2)):
    """A LIMPQ-format pickle as LIMPQ's extractor writes it: DataParallel names, str bit keys, floats."""
    rng = np.random.default_rng(0)
    weight, act, names = {}, {}, []
    for l in table.candidates:
        if l == drop:
            continue
        name = prefix + l
        weight[name] = {str(b): float(v) for b, v in zip(bits, np.sort(rng.uniform(0.01, 1, len(bits))))}
        act[name] = {str(b): float(v) for b, v in zip(bits, np.sort(rng.uniform(0.01, 1, len(bits))))}
        names.append(name)
    path.write_bytes(pickle.dumps({"weight": weight, "act": act, "layer_name": names}))
    return weight, act


def test_limpq_pickle_round_trips_by_layer_name(tmp_path, resnet18_table):
    table = resnet18_table
    weight, act = _limpq_file(tmp_path / "ind.pkl", table)
    payload = read_limpq_pickle(tmp_path / "ind.pkl", table)
    assert payload["w_indicator"].shape == (len(table.candidates), 5) and list(payload["w_bits"]) == [6, 5, 4, 3, 2]
    l = table.candidates.index("layer3.1.conv2")
    assert payload["w_indicator"][l, 2] == weight["module.layer3.1.conv2"]["4"]
    assert payload["a_indicator"][l, 4] == act["module.layer3.1.conv2"]["2"]
    write_limpq_pickle(tmp_path / "back.pkl", payload, table.candidates)
    again = read_limpq_pickle(tmp_path / "back.pkl", table)
    for k in ("w_indicator", "a_indicator", "w_bits", "a_bits"):
        np.testing.assert_array_equal(again[k], payload[k])
    assert "module." not in "".join(pickle.loads((tmp_path / "back.pkl").read_bytes())["layer_name"])


def test_limpq_pickle_mismatches_are_named(tmp_path, resnet18_table):
    table = resnet18_table
    _limpq_file(tmp_path / "missing.pkl", table, drop="layer2.0.conv1")
    with pytest.raises(ValueError, match=r"missing.pkl: 'weight' has no indicators of layer 'layer2.0.conv1'"):
        read_limpq_pickle(tmp_path / "missing.pkl", table)
    weight, act = _limpq_file(tmp_path / "extra.pkl", table)
    weight["module.layer9.conv"], act["module.layer9.conv"] = weight["module.layer1.0.conv1"], {}
    (tmp_path / "extra.pkl").write_bytes(pickle.dumps({"weight": weight, "act": act, "layer_name": []}))
    with pytest.raises(ValueError, match=r"layers \['layer9.conv'\] are not Conv2d/Linear layers"):
        read_limpq_pickle(tmp_path / "extra.pkl", table)
    _limpq_file(tmp_path / "bits.pkl", table, bits=(8, 6, 5, 4, 3, 2))
    with pytest.raises(ValueError, match=r"bit-widths \[2, 3, 4, 5, 6, 8\].*\[8\] are not in the option table"):
        read_limpq_pickle(tmp_path / "bits.pkl", table)
    _limpq_file(tmp_path / "few.pkl", table, bits=(6, 4, 3, 2))
    with pytest.raises(ValueError, match=r"missing \[5\]"):
        read_limpq_pickle(tmp_path / "few.pkl", table)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"weight": {}, "act": {}, "x": np.float64(1.0)}))
    with pytest.raises(ValueError, match=r"evil.pkl: not a LIMPQ indicator pickle \(it refers to numpy"):
        read_limpq_pickle(tmp_path / "evil.pkl", table)
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"expected a dict with keys 'weight', 'act'"):
        read_limpq_pickle(tmp_path / "list.pkl", table)
    with pytest.raises(ValueError, match=r"nope.pkl does not exist"):
        read_limpq_pickle(tmp_path / "nope.pkl", table)
    # fixed layers (first conv, fc) in the file are fine: LIMPQ's files may carry them
    weight, act = _limpq_file(tmp_path / "fixed.pkl", table)
    weight["module.conv1"] = act["module.conv1"] = {"6": 1.0}
    (tmp_path / "fixed.pkl").write_bytes(pickle.dumps({"weight": weight, "act": act, "layer_name": []}))
    assert read_limpq_pickle(tmp_path / "fixed.pkl", table)["w_indicator"].shape[0] == len(table.candidates)


def test_schema_accepts_cr_budgets():
    import yaml

    raw = yaml.safe_load(open("config.yaml"))
    raw["budgets"], raw["finetune"] = ["cr-12.2", "avg_bits-3"], None
    cfg = validate_config(raw)
    assert "cr-12.2" in cfg["budgets"]
