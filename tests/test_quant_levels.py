"""ALQ/AMQ adaptive levels: lower expected variance than uniform levels on normal data, the AMQ
gradient matches finite differences, ALQ ends at a stationary point, stochastic quantization is
unbiased with the predicted variance, and deterministic level quantization of weights takes at most
2^bits values per channel."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from mpqflow.levels.apply import fake_quantize_levels, quantize_stochastic
from mpqflow.levels.fit import (
    TruncNormMixture,
    alq_levels,
    amq_levels,
    amq_variance_and_grad,
    expected_variance,
    expected_variance_grad,
    exponential_levels,
    fit_levels,
    fit_truncnorm,
    levels_for_bits,
    uniform_levels,
)

BUCKET = 8192


@pytest.fixture(scope="module")
def grad_vec():
    return torch.randn(2**16, generator=torch.Generator().manual_seed(0))


def _data_variance(v, levels, bucket_size):
    """Exact E||Q(v) - v||^2 of unbiased stochastic rounding on v (no sampling)."""
    b = v.double().view(-1, bucket_size)
    nrm = b.norm(dim=1, keepdim=True)
    r = b.abs() / nrm
    lv = torch.as_tensor(levels, dtype=torch.float64)
    j = torch.clamp(torch.searchsorted(lv, r.contiguous(), right=True) - 1, 0, lv.numel() - 2)
    return float((nrm**2 * (lv[j + 1] - r) * (r - lv[j])).sum())


def test_expected_variance_matches_quadrature():
    dist = TruncNormMixture(np.array([0.1, 0.4]), np.array([0.05, 0.3]), np.array([0.7, 0.3]))
    pdf = lambda r: sum(
        w * stats.truncnorm.pdf(r, -m / s, (1 - m) / s, m, s)  # noqa: E731
        for m, s, w in zip(dist.mu, dist.sigma, dist.weight)
    )
    lv = np.array([0.0, 0.05, 0.12, 0.3, 0.6, 1.0])
    want = sum(
        integrate.quad(lambda r: (b - r) * (r - a) * pdf(r), a, b, epsabs=1e-14)[0] for a, b in zip(lv[:-1], lv[1:])
    )
    assert expected_variance(lv, dist) == pytest.approx(want, rel=1e-9)
    assert dist.cdf(np.array([0.0, 1.0])).tolist() == pytest.approx([0.0, 1.0])
    x = dist.ppf(np.array([0.25, 0.9]), np.zeros(2), np.ones(2))
    assert dist.cdf(x).tolist() == pytest.approx([0.25, 0.9], abs=1e-12)
    # interior-level gradient against finite differences
    h = 1e-7
    fd = [
        (expected_variance(lv + h * e, dist) - expected_variance(lv - h * e, dist)) / (2 * h)
        for e in np.eye(lv.size)[1:-1]
    ]
    assert expected_variance_grad(lv, dist) == pytest.approx(fd, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("mixture", [False, True])
def test_adaptive_levels_beat_uniform_on_normal_data(grad_vec, mixture):
    dist = fit_truncnorm(grad_vec, BUCKET, mixture=mixture)
    assert dist.mu.size == (2**16 // BUCKET if mixture else 1)
    for bits in (3, 4):
        n = levels_for_bits(bits)
        uni, alq = uniform_levels(n), alq_levels(dist, n)
        amq, p = amq_levels(dist, n)
        assert 0 < p < 1 and torch.allclose(amq, exponential_levels(n, p))
        for lv in (alq, amq):
            assert lv[0] == 0 and lv[-1] == 1 and torch.all(torch.diff(lv) > 0)
        psi = {k: expected_variance(lv, dist) for k, lv in (("u", uni), ("alq", alq), ("amq", amq))}
        assert psi["alq"] < psi["u"] and psi["amq"] < psi["u"] and psi["alq"] <= psi["amq"] * (1 + 1e-9)
        # the model's ranking holds for the exact variance of rounding this very vector
        data = {k: _data_variance(grad_vec, lv, BUCKET) for k, lv in (("u", uni), ("alq", alq), ("amq", amq))}
        assert data["alq"] < 0.2 * data["u"] and data["amq"] < 0.2 * data["u"], data


def test_alq_is_stationary_and_uniform_for_flat_distribution(grad_vec):
    dist = fit_truncnorm(grad_vec, BUCKET)
    lv = alq_levels(dist, 8)
    slope = np.abs(expected_variance_grad(uniform_levels(8), dist)).max()
    assert np.abs(expected_variance_grad(lv, dist)).max() < 1e-8 * slope
    # for (almost) uniform r, Psi = sum gap^3 / 6 is minimized by equal gaps
    flat = TruncNormMixture(np.array([0.5]), np.array([1e3]), np.array([1.0]))
    torch.testing.assert_close(alq_levels(flat, 6), uniform_levels(6), atol=1e-6, rtol=0)
    # many levels, most of [0, 1] empty under L2 normalization: still ordered and stationary
    lv = alq_levels(dist, 128)
    assert torch.all(torch.diff(lv) > 0)
    assert expected_variance(lv, dist) < expected_variance(uniform_levels(128), dist) / 100


@pytest.mark.parametrize("mixture", [False, True])
def test_amq_gradient_matches_finite_differences(grad_vec, mixture):
    dist = fit_truncnorm(grad_vec, 1024, norm="linf", mixture=mixture)
    for n in (4, 8):
        for p in (0.15, 0.4, 0.7, 0.9):
            h = 1e-6
            fd = (amq_variance_and_grad(p + h, dist, n)[0] - amq_variance_and_grad(p - h, dist, n)[0]) / (2 * h)
            assert amq_variance_and_grad(p, dist, n)[1] == pytest.approx(fd, rel=1e-5)
        _, p_opt = amq_levels(dist, n)
        f, g = amq_variance_and_grad(p_opt, dist, n)
        assert abs(g) < 1e-6 * abs(amq_variance_and_grad(0.15, dist, n)[1])


def test_quantize_stochastic_is_unbiased_with_predicted_variance():
    g = torch.Generator().manual_seed(5)
    v = torch.randn(3, 50, generator=g)  # 150 coordinates, buckets of 64: the last one is padded
    lv = torch.tensor([0.0, 0.05, 0.15, 0.4, 1.0])
    draws = torch.stack([quantize_stochastic(v, lv, 64, generator=g) for _ in range(4000)])  # (T, 3, 50)
    assert draws.shape == (4000, 3, 50) and draws.dtype == v.dtype
    # every value is +-norm * level of its bucket
    flat = draws.reshape(4000, -1)
    norms = torch.nn.functional.pad(v.reshape(-1), (0, 42)).view(-1, 64).norm(dim=1)
    for b in range(3):
        vals = (flat[:, b * 64 : (b + 1) * 64].abs() / norms[b]).unique()
        assert vals.numel() <= 5
        assert torch.all(torch.isclose(vals[:, None], lv[None].float(), atol=1e-6).any(1))
    # unbiased: the mean over draws is within 5 standard errors of v, and the variance as predicted
    var = draws.double().var(0)
    r = v.double().reshape(-1)
    nrm = torch.repeat_interleave(norms.double(), 64)[:150]
    rr = r.abs() / nrm
    j = torch.clamp(torch.searchsorted(lv.double(), rr, right=True) - 1, 0, 3)
    pred = (nrm**2 * (lv.double()[j + 1] - rr) * (rr - lv.double()[j])).view(3, 50)
    err = (draws.double().mean(0) - v.double()).abs()
    assert torch.all(err <= 5 * (pred / 4000).sqrt() + 1e-6)
    assert float(var.sum()) == pytest.approx(float(pred.sum()), rel=0.05)
    # reproducible with a generator, signs kept
    a = quantize_stochastic(v, lv, 64, torch.Generator().manual_seed(1))
    b = quantize_stochastic(v, lv, 64, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.all(torch.sign(a) * torch.sign(v) >= 0)


@pytest.mark.parametrize("method", ["uniform", "alq", "amq"])
def test_weight_levels_at_most_2_pow_bits_values_per_channel(method):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(8, 4, 3, 3, generator=g) * torch.linspace(0.1, 2, 8)[:, None, None, None]
    for bits in (2, 3, 4):
        lv = fit_levels(w, levels_for_bits(bits), method, ch_axis=0)
        w_q = fake_quantize_levels(w, lv, ch_axis=0)
        assert w_q.shape == w.shape and w_q.dtype == w.dtype
        for c in range(8):
            assert w_q[c].unique().numel() <= 2**bits
        # linf buckets: each channel's largest magnitude is kept, the rest rounds to the nearest level
        torch.testing.assert_close(w_q.abs().amax((1, 2, 3)), w.abs().amax((1, 2, 3)))
        gap = float(torch.diff(lv).max()) * w.abs().amax((1, 2, 3))
        assert torch.all((w_q - w).abs() <= gap[:, None, None, None] / 2 + 1e-6)
    per_tensor = fake_quantize_levels(w, uniform_levels(4))
    assert per_tensor.unique().numel() <= 7
    # transposed layout: channel axis 1
    torch.testing.assert_close(fake_quantize_levels(w.transpose(0, 1), lv, ch_axis=1), w_q.transpose(0, 1))
    assert math.isfinite(expected_variance(lv, fit_truncnorm(w, 36, norm="linf")))


# ---------------------------------------------------------------- weight-quantizer option (QuantScheme.levels)


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3))


@pytest.mark.parametrize("levels", ["alq", "amq"])
def test_model_quantizer_levels_option(levels):
    from mpqflow.quant import ModelQuantizer, QuantScheme

    model = _tiny()
    act = QuantScheme.of(observer="ema_minmax", symmetric=False)
    for granularity, ch_axis in (("per_channel", 0), ("per_tensor", None)):
        scheme = QuantScheme.of(granularity=granularity, levels=levels)
        q = ModelQuantizer(model, ["0", "2"], scheme, act, [2, 3, 4], [8])
        q.calibrate([torch.randn(4, 3, 8, 8)])
        w = model[2].weight.detach()
        for bits in (2, 3, 4):
            w_q = q.quantized_weight("2", bits)
            want = fake_quantize_levels(
                w, fit_levels(w, levels_for_bits(bits), levels, ch_axis=ch_axis), ch_axis=ch_axis
            )
            torch.testing.assert_close(w_q, want)
            for c in range(w.shape[0]):
                assert w_q[c].unique().numel() <= 2**bits - 1
        # deterministic in the weights: a reloaded quantizer applies the same weights
        q2 = ModelQuantizer(model, ["0", "2"], scheme, act, [2, 3, 4], [8])
        q2.load_state_dict(q.state_dict())
        torch.testing.assert_close(q2.quantized_weight("0", 3), q.quantized_weight("0", 3))
        with q.applied({"0": (3, 8), "2": (2, None)}):
            assert torch.equal(model[2].weight, q.quantized_weight("2", 2))
    with pytest.raises(ValueError, match="at least 2 bits"):
        ModelQuantizer(model, ["0"], QuantScheme.of(symmetric=False, levels=levels), act, [1, 4], [8])
    with pytest.raises(ValueError, match="weights only"):
        ModelQuantizer(model, ["0"], QuantScheme.of(), QuantScheme.of(levels=levels), [4], [8])
    with pytest.raises(ValueError, match="QuantScheme.levels"):
        QuantScheme.of(levels="lloyd")
    assert QuantScheme.from_dict({"observer": "mse"}).levels == "uniform"  # old dicts still load
