"""Tests of mpqflow.quant.scheme (QuantScheme, registry) and mpqflow.quant.observers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mpqflow.quant import (
    OBSERVERS,
    EMAMinMaxObserver,
    EMAMSEObserver,
    MinMaxObserver,
    MSEObserver,
    QuantScheme,
    choose_qparams,
    make_observer,
    mse_clip_range,
    quantization_mse,
    register_observer,
)
from mpqflow.quant.functional import clip_ratios

# ---------------------------------------------------------------- QuantScheme


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        ({"observer": "max"}, "observer", "'max'"),
        ({"granularity": "per_row"}, "granularity", "'per_row'"),
        ({"symmetric": 1}, "symmetric", "1"),
        ({"pow2_scale": "yes"}, "pow2_scale", "'yes'"),
        ({"ch_axis": 1.5}, "ch_axis", "1.5"),
        ({"averaging_constant": 0.0}, "averaging_constant", "0.0"),
        ({"averaging_constant": 1.5}, "averaging_constant", "1.5"),
        ({"mse_grid": 1}, "mse_grid", "1"),
        ({"mse_grid": 10.0}, "mse_grid", "10.0"),
        ({"aciq_model": "paper"}, "aciq_model", "'paper'"),
    ],
)
def test_scheme_validation_names_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError) as err:
        QuantScheme.of(**kwargs)
    msg = str(err.value)
    assert f"QuantScheme.{field}" in msg and f"got {value}" in msg and "expected" in msg


def test_scheme_dict_round_trip_and_unknown_key():
    s = QuantScheme.of(
        observer="ema_mse",
        granularity="per_channel",
        symmetric=False,
        pow2_scale=True,
        averaging_constant=0.1,
        mse_grid=50,
    )
    assert QuantScheme.from_dict(s.to_dict()) == s
    assert QuantScheme.from_dict({}) == QuantScheme.of()
    assert QuantScheme.from_dict({"observer": "mse"}).observer == "mse"
    with pytest.raises(ValueError, match="unknown key.*'gran'"):
        QuantScheme.from_dict({"gran": "per_channel"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.observer = "minmax"  # frozen


def test_schema_scheme_matches_quant_scheme():
    """schemas/config.schema.yaml's $defs/scheme: every key a QuantScheme field whose default (filled in
    by from_dict) is the schema's, every enum the vocabulary QuantScheme validates against."""
    import dataclasses
    from pathlib import Path

    import yaml

    from mpqflow.quant import BIAS_CORRECTIONS, GRANULARITIES, LEVELS
    from mpqflow.quant.aciq import MODELS

    schema = yaml.safe_load((Path(__file__).parents[1] / "schemas" / "config.schema.yaml").read_text())
    props = schema["$defs"]["scheme"]["properties"]
    defaults = QuantScheme.from_dict({}).to_dict()
    assert {f.name for f in dataclasses.fields(QuantScheme)} == set(defaults)
    assert set(props) <= set(defaults), set(props) - set(defaults)
    assert "aciq_model" in props
    for key, spec in props.items():
        if "default" in spec:
            assert spec["default"] == defaults[key], key
    vocab = {"granularity": GRANULARITIES, "levels": LEVELS, "bias_correction": BIAS_CORRECTIONS, "aciq_model": MODELS}
    for key, values in vocab.items():
        assert sorted(props[key]["enum"]) == sorted(values), key
    assert set(props["observer"]["enum"]) <= set(OBSERVERS)


def test_registry_is_open():
    class Half(MinMaxObserver):
        def _observe(self, x):
            self.stats(x / 2)

    register_observer("half_minmax")(lambda scheme, bits, signed: Half(bits, signed=signed))
    try:
        obs = make_observer(QuantScheme.of(observer="half_minmax"), 4, True)
        obs(torch.tensor([-2.0, 4.0]))
        assert obs.max_val.item() == 2.0
    finally:
        del OBSERVERS["half_minmax"]
    with pytest.raises(ValueError, match="half_minmax"):
        QuantScheme.of(observer="half_minmax")


# ---------------------------------------------------------------- observers


def test_make_observer_kinds():
    kinds = {"minmax": MinMaxObserver, "ema_minmax": EMAMinMaxObserver, "mse": MSEObserver, "ema_mse": EMAMSEObserver}
    for name, cls in kinds.items():
        obs = make_observer(QuantScheme.of(observer=name, granularity="per_channel", ch_axis=1), 4, None)
        assert type(obs) is cls and obs.ch_axis == 1 and obs.bits == 4
        assert make_observer(QuantScheme.of(observer=name), 4, True).ch_axis is None


def test_minmax_running_range_and_qparams():
    obs = make_observer(QuantScheme.of(), 4, True)
    with pytest.raises(RuntimeError, match="observed no data"):
        obs.calculate_qparams()
    x1, x2 = torch.tensor([-1.0, 0.5]), torch.tensor([-0.2, 2.0])
    assert obs(x1) is x1
    obs(x2)
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 2.0)
    s, z, qmin, qmax = obs.calculate_qparams()
    assert s.item() == pytest.approx(2.0 / 7) and (z.item(), qmin, qmax) == (0, -7, 7)


def test_minmax_per_channel():
    obs = make_observer(QuantScheme.of(granularity="per_channel", symmetric=False), 8, None)
    w = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, 0.0]])
    obs(w)
    assert obs.min_val.tolist() == [-2.0, 0.0] and obs.max_val.tolist() == [3.0, 0.5]
    s, z, qmin, qmax = obs.calculate_qparams()
    assert (qmin, qmax) == (-128, 127)  # some channel is negative -> signed range
    assert s.tolist() == pytest.approx([5.0 / 255, 0.5 / 255])


def test_ema_minmax_by_hand():
    obs = make_observer(QuantScheme.of(observer="ema_minmax", averaging_constant=0.25), 8, None)
    obs(torch.tensor([-1.0, 1.0]))  # first batch initializes: (-1, 1)
    obs(torch.tensor([-3.0, 5.0]))  # (-1 + 0.25 * (-2), 1 + 0.25 * 4) = (-1.5, 2)
    obs(torch.tensor([1.0, 2.0]))  # (-1.5 + 0.25 * 2.5, 2 + 0) = (-0.875, 2)
    assert obs.min_val.item() == pytest.approx(-0.875) and obs.max_val.item() == pytest.approx(2.0)


def test_signed_from_data():
    for name in ("minmax", "ema_minmax", "mse", "ema_mse"):
        scheme = QuantScheme.of(observer=name, symmetric=True)
        relu = make_observer(scheme, 4, None)
        relu(torch.relu(torch.randn(1000)))
        s, z, qmin, qmax = relu.calculate_qparams()
        assert (qmin, qmax) == (0, 15), name
        signed = make_observer(scheme, 4, None)
        signed(torch.randn(1000))
        assert signed.calculate_qparams()[2:] == (-7, 7), name
        forced = make_observer(scheme, 4, True)
        forced(torch.relu(torch.randn(1000)))
        assert forced.calculate_qparams()[2:] == (-7, 7), name


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_mse_observer_beats_minmax_on_heavy_tails(bits, granularity):
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(3.0).sample((32, 256)) * 0.05  # weights with outliers
    ch_axis = 0 if granularity == "per_channel" else None
    errs = {}
    for name in ("minmax", "mse"):
        obs = make_observer(QuantScheme.of(observer=name, granularity=granularity), bits, True)
        obs(w)
        errs[name] = (
            quantization_mse(w, obs.min_val, obs.max_val, bits, symmetric=True, signed=True, ch_axis=ch_axis)
            .mean()
            .item()
        )
    assert errs["mse"] < 0.9 * errs["minmax"]


def test_mse_observer_running_range_of_batch_optima():
    torch.manual_seed(0)
    batches = [torch.distributions.Laplace(0.0, 1.0 + i).sample((3, 500)) for i in range(3)]
    kw = dict(symmetric=False, signed=True, ch_axis=0, ratios=clip_ratios(20))
    best = [mse_clip_range(x, 3, **kw) for x in batches]
    obs = make_observer(
        QuantScheme.of(observer="mse", granularity="per_channel", symmetric=False, mse_grid=20), 3, True
    )
    ema = make_observer(
        QuantScheme.of(
            observer="ema_mse", granularity="per_channel", symmetric=False, mse_grid=20, averaging_constant=0.5
        ),
        3,
        True,
    )
    for x in batches:
        obs(x)
        ema(x)
    assert torch.allclose(obs.min_val, torch.stack([b[0] for b in best]).amin(0))
    assert torch.allclose(obs.max_val, torch.stack([b[1] for b in best]).amax(0))
    ema_lo, ema_hi = best[0]
    for lo, hi in best[1:]:
        ema_lo, ema_hi = ema_lo + 0.5 * (lo - ema_lo), ema_hi + 0.5 * (hi - ema_hi)
    assert torch.allclose(ema.min_val, ema_lo) and torch.allclose(ema.max_val, ema_hi)


@pytest.mark.parametrize("name", ["minmax", "ema_minmax", "mse", "ema_mse"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_observer_state_dict_round_trip(name, granularity):
    scheme = QuantScheme.of(observer=name, granularity=granularity, symmetric=False)
    obs = make_observer(scheme, 4, None)
    for _ in range(2):
        obs(torch.randn(4, 64))
    state = obs.state_dict()
    assert any(k.endswith("min_val") for k in state) and any(k.endswith("max_val") for k in state)
    fresh = make_observer(scheme, 4, None)
    fresh.load_state_dict(state)
    for a, b in zip(obs.calculate_qparams(), fresh.calculate_qparams()):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_qparams_match_functional_core():
    x = torch.randn(5, 40)
    obs = make_observer(QuantScheme.of(granularity="per_channel", pow2_scale=True), 3, True)
    obs(x)
    ref = choose_qparams(x.amin(1), x.amax(1), 3, symmetric=True, signed=True, pow2_scale=True)
    for a, b in zip(obs.calculate_qparams(), ref):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_one_bit_observers():
    with pytest.raises(ValueError, match="1-bit"):
        make_observer(QuantScheme.of(), 1, True)
    obs = make_observer(QuantScheme.of(), 1, None)
    obs(torch.relu(torch.randn(100)))
    assert obs.calculate_qparams()[2:] == (0, 1)
    obs = make_observer(QuantScheme.of(), 1, None)
    obs(torch.randn(100))
    with pytest.raises(ValueError, match="1-bit signed symmetric"):
        obs.calculate_qparams()
