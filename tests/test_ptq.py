"""PTQ study on the digits model: ACIQ + bias correction at W4A4 is not worse than naive min/max; the
table has every (variant, option) row; the plot is a PNG; bit-rates are in (0, bits]."""

import pytest
import torch

from mpqflow.config import Config, QuantConfig, validate_config
from mpqflow.ptq_study import ptq_plot, ptq_table
from mpqflow.stages.ptq import VARIANTS, ptq_variant, variant_quant
from mpqflow.stages.train import train_or_load

OPTIONS = ["w4a4", "w4a8", "w8a4"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = Config.from_dict(
        validate_config(
            {
                "seed": 0,
                "device": "cpu",
                "threads": 1,
                "models": {
                    "tiny": {
                        "arch": "digits_cnn",
                        "dataset": {"name": "digits"},
                        "train": {"epochs": 4, "batch_size": 64, "lr": 0.1},
                    }
                },
                "quant": {"calibration_samples": 128, "calibration_batch_size": 64},
                "ptq": {"variants": ["naive", "aciq_bias", "all"], "options": OPTIONS},
                "budgets": ["avg_bits-4"],
            }
        )
    )
    ckpt = str(tmp_path_factory.mktemp("ptq") / "model.pt")
    fp = train_or_load(cfg.models["tiny"], cfg.seed, cfg.evaluation, cfg.runtime, ckpt)
    assert fp["top1"] > 0.9
    return cfg, ckpt


@pytest.fixture(scope="module")
def results(digits, tmp_path_factory):
    cfg, ckpt = digits
    out = tmp_path_factory.mktemp("ptq_out")
    return {
        v: ptq_variant(
            v,
            cfg.models["tiny"],
            cfg.quant,
            cfg.ptq,
            cfg.seed,
            cfg.evaluation,
            cfg.runtime,
            ckpt,
            str(out / f"{v}.json"),
        )
        for v in cfg.ptq.variants
    }


def _top1(result, option):
    return next(r["top1"] for r in result["rows"] if r["option"] == option)


def test_aciq_bias_not_worse_than_naive_at_w4a4(results):
    naive, aciq = _top1(results["naive"], "w4a4"), _top1(results["aciq_bias"], "w4a4")
    print(f"W4A4 top-1: naive {naive:.4f}, aciq+bias {aciq:.4f}, all {_top1(results['all'], 'w4a4'):.4f}")
    # within one held-out image (450 here): on this tiny model the two differ by a sample or two, and
    # which one wins moved with the symmetric grid (issue 15's restricted range)
    one_image = 1.0 / 450  # the digits held-out split
    assert abs(naive * 450 - round(naive * 450)) < 1e-6  # (top-1 is a count of those 450)
    assert aciq >= naive - one_image - 1e-9, (aciq, naive)


def test_bit_rate_between_zero_and_bits(results):
    for res in results.values():
        for r in res["rows"]:
            w, a = (int(b) for b in r["option"][1:].split("a"))
            assert 0 < r["weight_entropy_bits"] <= w + 1e-9
            assert 0 < r["act_entropy_bits"] <= a + 1e-9


def test_table_and_plot(results, tmp_path):
    df = ptq_table(list(results.values()))
    assert sorted(zip(df.variant, df.option)) == sorted((v, o) for v in results for o in OPTIONS)
    assert df.top1.between(0, 1).all()
    png = tmp_path / "ptq.png"
    fig = ptq_plot(df, str(png), dpi=50)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = fig.axes
    variants = list(dict.fromkeys(df.variant))
    assert [(c.get_label(), len(c)) for c in ax.containers] == [(v, len(OPTIONS)) for v in variants]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["FP", *variants]
    assert [t.get_text() for t in ax.get_xticklabels()] == [o.upper() for o in OPTIONS]


def test_variant_quant_overrides():
    raw = validate_config({"models": {"m": {"arch": "digits_cnn", "dataset": {"name": "digits"}}}})
    cfg = Config.from_dict(raw)
    q = variant_quant(cfg.quant, cfg.ptq, "all")
    assert isinstance(q, QuantConfig)
    assert q.weight["observer"] == "aciq_laplace" and q.weight["bit_allocation"]
    assert q.activation["granularity"] == "per_channel" and q.weight["bias_correction"] == "bias_variance"
    assert q.w_bits == (2, 3, 4) and q.a_bits == (2, 3, 4)  # the bits of the default options w4a4 w3a3 w2a4 w4a2
    # every variant is a valid quant section (with budgets within reach of its bits)
    assert validate_config({**raw, "quant": q.to_dict(), "budgets": ["avg_bits-4"]})["quant"] == q.to_dict()
    assert set(cfg.ptq.variants) <= set(VARIANTS)
    with pytest.raises(ValueError, match="unknown PTQ variant"):
        variant_quant(cfg.quant, cfg.ptq, "nope")
