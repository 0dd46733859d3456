"""Tests of mpqflow.quant.functional against hand-computed numbers and plain-python references."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mpqflow.quant.functional import (
    DEFAULT_EPS,
    choose_qparams,
    clip_ratios,
    fake_quantize,
    mse_clip_range,
    quant_range,
    quantization_mse,
)


def _ref_fq(values, scale, zp, qmin, qmax):
    """Plain-python fake quantization (round half to even, like torch)."""
    return [(min(max(round(v / scale) + zp, qmin), qmax) - zp) * scale for v in values]


def _ref_qparams(lo, hi, bits, symmetric, signed):
    """Plain-python qparams: the formulas of the design, written out again."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric and signed:  # restricted range, the default
        return max(-lo, hi) / qmax, 0, -qmax, qmax
    if symmetric:
        return hi / qmax, 0, qmin, qmax
    scale = (hi - lo) / (qmax - qmin)
    return scale, int(min(max(qmin - round(lo / scale), qmin), qmax)), qmin, qmax


def test_quant_range():
    assert quant_range(2, True) == (-2, 1)
    assert quant_range(4, True) == (-8, 7)
    assert quant_range(8, True) == (-128, 127)
    assert quant_range(8, False) == (0, 255)
    assert quant_range(16, True) == (-32768, 32767)
    assert quant_range(1, False) == (0, 1)
    assert quant_range(1, True) == (-1, 0)
    for bad in (0, 17, 2.0, True):
        with pytest.raises(ValueError, match="bits"):
            quant_range(bad, True)


def test_choose_qparams_by_hand():
    # symmetric signed 4 bit, restricted range (default): [-7, 7], scale = amax / 7
    s, z, qmin, qmax = choose_qparams(torch.tensor(-1.4), torch.tensor(0.9), 4, symmetric=True, signed=True)
    assert (qmin, qmax) == (-7, 7) and z.item() == 0 and z.dtype == torch.int32
    assert s.item() == pytest.approx(0.2) and s.shape == () and s.dtype == torch.float32
    # torch's scale amax / 7.5, the integers still [-7, 7] (the tie at -7.5 clamps to -7 either way)
    s, z, qmin, qmax = choose_qparams(-1.2, 0.9, 4, symmetric=True, signed=True, symmetric_range=False)
    assert (qmin, qmax) == (-7, 7) and s.item() == pytest.approx(0.16)
    # symmetric signed 8 bit: amax / 127 (full range: amax / 127.5)
    s, z, qmin, _ = choose_qparams(-0.5, 2.54, 8, symmetric=True, signed=True)
    assert s.item() == pytest.approx(0.02) and qmin == -127
    s, z, _, _ = choose_qparams(-0.5, 2.55, 8, symmetric=True, signed=True, symmetric_range=False)
    assert s.item() == pytest.approx(0.02)
    # 2 bits restricted: ternary {-amax, 0, amax}
    s, z, qmin, qmax = choose_qparams(-0.3, 0.2, 2, symmetric=True, signed=True)
    assert (qmin, qmax) == (-1, 1) and s.item() == pytest.approx(0.3)
    # symmetric unsigned 4 bit: max / 15
    s, z, qmin, qmax = choose_qparams(0.0, 3.0, 4, symmetric=True, signed=False)
    assert (qmin, qmax, z.item()) == (0, 15, 0) and s.item() == pytest.approx(0.2)
    # affine unsigned 4 bit: scale = 1.5 / 15 = 0.1, zp = 0 - round(-0.5 / 0.1) = 5
    s, z, qmin, qmax = choose_qparams(-0.5, 1.0, 4, symmetric=False, signed=False)
    assert (qmin, qmax, z.item()) == (0, 15, 5) and s.item() == pytest.approx(0.1)
    # affine signed 2 bit: scale = 1.5 / 3 = 0.5, zp = -2 - round(-0.3 / 0.5) = -1
    s, z, qmin, qmax = choose_qparams(-0.3, 1.2, 2, symmetric=False, signed=True)
    assert (qmin, qmax, z.item()) == (-2, 1, -1) and s.item() == pytest.approx(0.5)
    # affine with min > 0: the range is widened to include 0 -> zp = qmin
    s, z, _, _ = choose_qparams(0.5, 1.5, 8, symmetric=False, signed=False)
    assert z.item() == 0 and s.item() == pytest.approx(1.5 / 255)


def test_choose_qparams_per_channel_and_zero_range():
    s, z, _, _ = choose_qparams(
        torch.tensor([-1.5, 0.0, -0.2]), torch.tensor([0.3, 0.0, 3.0]), 4, symmetric=True, signed=True
    )
    assert s.shape == (3,) and z.shape == (3,)
    assert s.tolist() == pytest.approx([1.5 / 7, DEFAULT_EPS, 3.0 / 7])
    s, z, _, _ = choose_qparams(torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 0.0]), 2, symmetric=False, signed=False)
    assert s.tolist() == pytest.approx([1.0, DEFAULT_EPS]) and z.tolist() == [1, 0]


def test_one_bit():
    with pytest.raises(ValueError, match="1-bit signed symmetric"):
        choose_qparams(-1.0, 1.0, 1, symmetric=True, signed=True)
    s, z, qmin, qmax = choose_qparams(0.0, 2.0, 1, symmetric=True, signed=False)
    x = torch.tensor([0.1, 0.9, 1.1, 3.0])
    assert fake_quantize(x, s, z, qmin, qmax).tolist() == pytest.approx([0.0, 0.0, 2.0, 2.0])
    s, z, qmin, qmax = choose_qparams(-1.0, 3.0, 1, symmetric=False, signed=True)  # levels {0, 4}
    assert torch.unique(fake_quantize(torch.linspace(-1, 3, 50), s, z, qmin, qmax)).numel() == 2


def test_fake_quantize_per_tensor_by_hand():
    # symmetric signed 4 bit, scale 0.25: x / s = [-9.2, -2.4, 0.4, 1.32, 4.4, 7.6] -> [-8, -2, 0, 1, 4, 7]
    x = torch.tensor([-2.3, -0.6, 0.1, 0.33, 1.1, 1.9])
    y = fake_quantize(x, torch.tensor(0.25), torch.tensor(0, dtype=torch.int32), -8, 7)
    assert y.tolist() == pytest.approx([-2.0, -0.5, 0.0, 0.25, 1.0, 1.75])
    # symmetric signed 2 bit, scale 0.5: [-1.4, -0.4, 0.2, 0.6, 1.9] -> [-1, 0, 0, 1, 1 (clamped)]
    x = torch.tensor([-0.7, -0.2, 0.1, 0.3, 0.95])
    y = fake_quantize(x, torch.tensor(0.5), torch.tensor(0, dtype=torch.int32), -2, 1)
    assert y.tolist() == pytest.approx([-0.5, 0.0, 0.0, 0.5, 0.5])
    # affine unsigned 2 bit, scale 0.5, zp 1: q = clamp(round(x / 0.5) + 1, 0, 3), y = (q - 1) * 0.5
    x = torch.tensor([-0.3, 0.0, 0.4, 0.8, 1.2])
    y = fake_quantize(x, torch.tensor([0.5]), torch.tensor([1], dtype=torch.int32), 0, 3)
    assert y.tolist() == pytest.approx([-0.5, 0.0, 0.5, 1.0, 1.0])
    # 8 bit affine: zp 3, scale 0.02 -> range [-131 * 0.02, 124 * 0.02]
    x = torch.tensor([1.0, 2.6, -2.614, 0.013])
    y = fake_quantize(x, torch.tensor(0.02), torch.tensor(3, dtype=torch.int32), -128, 127)
    assert y.tolist() == pytest.approx([1.0, 2.48, -2.62, 0.02])


def test_fake_quantize_per_channel_by_hand():
    x = torch.tensor(
        [
            [12.34, -0.26, 0.04],  # channel 0: scale 0.1, zp 0
            [1.0, 2.6, -2.614],
        ]
    )  # channel 1: scale 0.02, zp 3
    scale, zp = torch.tensor([0.1, 0.02]), torch.tensor([0, 3], dtype=torch.int32)
    y = fake_quantize(x, scale, zp, -128, 127, ch_axis=0)
    assert y[0].tolist() == pytest.approx([12.3, -0.3, 0.0])
    assert y[1].tolist() == pytest.approx([1.0, 2.48, -2.62])
    y1 = fake_quantize(x.t().contiguous(), scale, zp, -128, 127, ch_axis=1)  # channels on axis 1
    assert torch.equal(y1, y.t())
    with pytest.raises(ValueError, match="ch_axis"):
        fake_quantize(x, scale, zp, -128, 127)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_against_plain_python_per_tensor(bits, symmetric):
    rng = random.Random(bits * 10 + symmetric)
    values = [rng.gauss(0.3, 1.0) for _ in range(200)]
    ref_scale, ref_zp, qmin, qmax = _ref_qparams(min(values), max(values), bits, symmetric, True)
    x = torch.tensor(values, dtype=torch.float64)
    s, z, qmin2, qmax2 = choose_qparams(x.min(), x.max(), bits, symmetric=symmetric, signed=True)
    assert (qmin2, qmax2, z.item()) == (qmin, qmax, ref_zp)
    assert s.item() == pytest.approx(ref_scale, rel=1e-6)
    y = fake_quantize(x.float(), s, z, qmin, qmax)
    ref = _ref_fq(values, s.item(), ref_zp, qmin, qmax)  # plain python with the float32 scale
    assert y.tolist() == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_against_plain_python_per_channel(bits, symmetric):
    rng = random.Random(100 + bits * 10 + symmetric)
    rows = [[rng.gauss(0.0, 0.1 * (c + 1)) + 0.05 * c for _ in range(50)] for c in range(4)]
    x = torch.tensor(rows)
    s, z, qmin, qmax = choose_qparams(x.amin(1), x.amax(1), bits, symmetric=symmetric, signed=False)
    y = fake_quantize(x, s, z, qmin, qmax, ch_axis=0)
    for c, row in enumerate(rows):
        ref_scale, ref_zp, rqmin, rqmax = _ref_qparams(min(row), max(row), bits, symmetric, False)
        assert (rqmin, rqmax, z[c].item()) == (qmin, qmax, ref_zp)
        assert s[c].item() == pytest.approx(ref_scale, rel=1e-6)
        assert y[c].tolist() == pytest.approx(_ref_fq(row, s[c].item(), ref_zp, qmin, qmax), abs=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pow2_scales(symmetric):
    lo, hi = -torch.rand(16) * 3, torch.rand(16) * 5
    for bits in range(2, 17):
        s, _, _, _ = choose_qparams(lo, hi, bits, symmetric=symmetric, signed=True)
        s2, _, _, _ = choose_qparams(lo, hi, bits, symmetric=symmetric, signed=True, pow2_scale=True)
        exps = torch.log2(s2.double())
        assert torch.equal(exps, exps.round()), bits
        assert (s2 >= s).all() and (s2 < 2 * s).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_at_most_2_pow_bits_values_per_channel(bits, symmetric):
    signed = not (symmetric and bits == 1)
    x = torch.randn(8, 4000) * torch.linspace(0.1, 3, 8)[:, None] + 0.2
    for pow2 in (False, True):
        s, z, qmin, qmax = choose_qparams(
            x.amin(1), x.amax(1), bits, symmetric=symmetric, signed=signed, pow2_scale=pow2
        )
        y = fake_quantize(x, s, z, qmin, qmax, ch_axis=0)
        for c in range(8):
            assert torch.unique(y[c]).numel() <= 2**bits
        s, z, qmin, qmax = choose_qparams(x.min(), x.max(), bits, symmetric=symmetric, signed=signed, pow2_scale=pow2)
        assert torch.unique(fake_quantize(x, s, z, qmin, qmax)).numel() <= 2**bits


def test_sixteen_bits_is_fine_grained():
    x = torch.randn(1000)
    s, z, qmin, qmax = choose_qparams(x.min(), x.max(), 16, symmetric=False, signed=False)
    assert (qmin, qmax) == (0, 65535)
    err = (fake_quantize(x, s, z, qmin, qmax) - x).abs().max().item()
    assert err <= s.item() / 2 + 1e-7


def test_quantization_mse_matches_definition():
    x = torch.randn(3, 100)
    mse = quantization_mse(x, x.amin(1), x.amax(1), 3, symmetric=True, signed=True, ch_axis=0)
    s, z, qmin, qmax = choose_qparams(x.amin(1), x.amax(1), 3, symmetric=True, signed=True)
    ref = (fake_quantize(x, s, z, qmin, qmax, ch_axis=0) - x).pow(2).mean(1)
    assert torch.allclose(mse, ref)
    assert quantization_mse(x, x.min(), x.max(), 3, symmetric=True, signed=True).shape == ()


def test_mse_clip_range_beats_minmax_on_outliers():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((4, 2000))
    x[:, :5] *= 8  # outliers
    lo, hi = mse_clip_range(x, 3, symmetric=True, signed=True, ch_axis=0)
    assert lo.shape == (4,) and (hi <= x.amax(1)).all() and (lo >= x.amin(1)).all()
    best = quantization_mse(x, lo, hi, 3, symmetric=True, signed=True, ch_axis=0)
    plain = quantization_mse(x, x.amin(1), x.amax(1), 3, symmetric=True, signed=True, ch_axis=0)
    assert (best < 0.7 * plain).all()
    # the search is exhaustive over the grid: no ratio does better
    for r in clip_ratios(100)[::7]:
        other = quantization_mse(x, r * x.amin(1), r * x.amax(1), 3, symmetric=True, signed=True, ch_axis=0)
        assert (best <= other + 1e-7).all()
    assert math.isclose(clip_ratios(100)[0].item(), 0.01) and clip_ratios(100)[-1].item() == 1.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_symmetric_grid_extremes_are_not_ties(bits, per_channel):
    """Issue 15: the full-range grid put each channel's extreme on x / scale = ±(2^(b-1) - 0.5), so its
    level depended on float precision. The restricted grid maps the extreme exactly onto ±qmax, and
    quantizing float32 data gives the same result as the float64 computation of the same formula."""
    g = torch.Generator().manual_seed(bits)
    w = (
        torch.randn(16, 3, 3, 3, generator=g, dtype=torch.float64)
        * torch.logspace(-2, 0, 16, dtype=torch.float64)[:, None, None, None]
    )
    w = w.float()  # float32 weights, as in every model
    axis = 0 if per_channel else None
    dims = (1, 2, 3) if per_channel else (0, 1, 2, 3)
    lo, hi = w.amin(dims), w.amax(dims)
    s, z, qmin, qmax = choose_qparams(lo, hi, bits, symmetric=True, signed=True)
    y32 = fake_quantize(w, s, z, qmin, qmax, ch_axis=axis)
    shape = (-1, 1, 1, 1) if per_channel else ()
    v = w.double() / s.double().reshape(shape)  # float64 codes of the same float32 scale
    y64 = (torch.clamp(torch.round(v), qmin, qmax) * s.double().reshape(shape)).float()
    assert torch.equal(y32, y64)
    at_extreme = w.abs() == torch.maximum(-lo, hi).reshape(shape)
    assert torch.all(torch.round(v.abs())[at_extreme] == qmax)  # each extreme takes the outermost level
    assert torch.all((v.abs()[at_extreme] - qmax).abs() < 1e-5)  # ... and sits on it, far from a tie
    # torch's scale (symmetric_range=False): the extreme sits on the tie -(2^(b-1) - 1/2), which with
    # torch's integers -2^(b-1)..2^(b-1)-1 broke either way; here both ways clamp to -(2^(b-1) - 1)
    s, z, qmin, qmax = choose_qparams(lo, hi, bits, symmetric=True, signed=True, symmetric_range=False)
    v = (w.double() / s.double().reshape(shape)).abs()
    assert torch.isclose(v.amax(), torch.tensor(2.0 ** (bits - 1) - 0.5, dtype=torch.float64), rtol=1e-6)
    assert (qmin, qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    y32 = fake_quantize(w, s, z, qmin, qmax, ch_axis=axis)
    v = w.double() / s.double().reshape(shape)
    assert torch.equal(y32, (torch.clamp(torch.round(v), qmin, qmax) * s.double().reshape(shape)).float())
    ext = v[at_extreme]  # on the tie: rounding down or up lands on the same level after the clamp
    assert torch.equal(torch.clamp(torch.floor(ext), qmin, qmax), torch.clamp(torch.ceil(ext), qmin, qmax))
