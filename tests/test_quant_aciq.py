"""ACIQ clipping: alpha* is a stationary point of the analytic MSE, the closed forms match quadrature,
and alpha* agrees with a brute-force minimization of the empirical MSE on large samples.
GEMMLOWP qparams represent 0.0 exactly and give at most 2^bits values per channel."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from mpqflow.quant import ACIQObserver, ModelQuantizer, QuantScheme, choose_qparams, fake_quantize, make_observer
from mpqflow.quant.aciq import (
    aciq_alpha,
    aciq_mse,
    aciq_mse_grad,
    aciq_range,
    aciq_range_from_sums,
    fit_prior,
    gemmlowp_qparams,
    merge_sums,
    moment_sums,
    optimal_clip_ratio,
)

CASES = [(p, one) for p in ("laplace", "gauss") for one in (False, True)]


def _grid(alpha, bits, one_sided, model="grid"):
    """The quantizers ACIQ models: 2^M levels spanning [-alpha, alpha] or [0, alpha] ("grid"), or
    the two's-complement grid k * 2 alpha / (2^M - 1), k = -2^(M-1) .. 2^(M-1) - 1 ("signed_grid"),
    the same without k = -2^(M-1) ("symmetric_grid") or 2^M - 1 levels spanning [-alpha, alpha]
    ("narrow_grid")."""
    h = 2 ** (bits - 1) - 1
    if model == "signed_grid" and not one_sided:
        return np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)) * (2 * alpha / (2**bits - 1))
    if model == "symmetric_grid" and not one_sided:
        return np.arange(-h, h + 1) * (2 * alpha / (2**bits - 1))
    if model == "narrow_grid" and not one_sided:
        return np.arange(-h, h + 1) * (alpha / h)
    return np.linspace(0.0 if one_sided else -alpha, alpha, 2**bits)


def _quantize(x, alpha, bits, one_sided):
    lo = 0.0 if one_sided else -alpha
    step = (alpha - lo) / (2**bits - 1)
    return lo + torch.clamp(torch.round((x - lo) / step), 0, 2**bits - 1) * step


@pytest.mark.parametrize("prior,one_sided", CASES)
@pytest.mark.parametrize("model", ["grid", "signed_grid", "symmetric_grid", "narrow_grid", "banner"])
def test_alpha_is_stationary_point(prior, one_sided, model):
    scale = 1.7
    for bits in (2, 3, 4, 8, 12):
        alpha = optimal_clip_ratio(bits, prior, one_sided=one_sided, model=model) * scale
        kw = dict(one_sided=one_sided, model=model)
        slope = abs(aciq_mse_grad(0.5 * alpha, bits, prior, scale, **kw))
        # the analytic derivative is the derivative of the MSE ...
        for a in (0.5 * alpha, alpha, 1.5 * alpha):
            h = 1e-5 * a
            fd = (aciq_mse(a + h, bits, prior, scale, **kw) - aciq_mse(a - h, bits, prior, scale, **kw)) / (2 * h)
            assert aciq_mse_grad(a, bits, prior, scale, **kw) == pytest.approx(fd, rel=1e-4, abs=1e-5 * slope)
        # ... it vanishes at alpha*, which is a minimum
        assert abs(aciq_mse_grad(alpha, bits, prior, scale, **kw)) < 1e-8 * slope
        mse = aciq_mse(alpha, bits, prior, scale, **kw)
        assert mse < aciq_mse(0.97 * alpha, bits, prior, scale, **kw)
        assert mse < aciq_mse(1.03 * alpha, bits, prior, scale, **kw)


def test_banner_model_reproduces_published_constants():
    # Banner et al. 2019: alpha* = 2.83b, 3.89b, 5.03b (Laplace), 1.71s, 2.15s, 2.55s (Gauss), M = 2, 3, 4
    for prior, want in (("laplace", [2.83, 3.89, 5.03]), ("gauss", [1.71, 2.15, 2.55])):
        got = [optimal_clip_ratio(m, prior, model="banner") for m in (2, 3, 4)]
        assert got == pytest.approx(want, abs=0.01)
    # one-sided with M bits has the two-sided Banner step of M + 1 bits
    assert optimal_clip_ratio(3, "gauss", one_sided=True, model="banner") == pytest.approx(
        optimal_clip_ratio(4, "gauss", model="banner")
    )
    # 1 bit two-sided: levels +-alpha, optimum alpha = E|X| (b, sigma sqrt(2/pi))
    assert optimal_clip_ratio(1, "laplace") == pytest.approx(1.0, rel=1e-9)
    assert optimal_clip_ratio(1, "gauss") == pytest.approx(math.sqrt(2 / math.pi), rel=1e-9)


@pytest.mark.parametrize("prior,one_sided", CASES)
@pytest.mark.parametrize("model", ["grid", "signed_grid", "symmetric_grid", "narrow_grid"])
def test_grid_mse_matches_quadrature(prior, one_sided, model):
    s = 0.8
    if prior == "laplace":
        pdf = (lambda x: math.exp(-x / s) / s) if one_sided else (lambda x: math.exp(-abs(x) / s) / (2 * s))
    else:
        pdf = (
            (lambda x: 2 * math.exp(-x * x / (2 * s * s)) / (s * math.sqrt(2 * math.pi)))
            if one_sided
            else (lambda x: math.exp(-x * x / (2 * s * s)) / (s * math.sqrt(2 * math.pi)))
        )
    for bits, alpha in ((2, 1.3), (3, 2.9), (4, 0.7)):
        lv = _grid(alpha, bits, one_sided, model)
        edges = np.concatenate([[0.0 if one_sided else -60 * s], (lv[1:] + lv[:-1]) / 2, [60 * s]])
        want = sum(
            integrate.quad(lambda x, q=q: (x - q) ** 2 * pdf(x), a, b, epsabs=1e-13)[0]
            for q, a, b in zip(lv, edges[:-1], edges[1:])
        )
        assert aciq_mse(alpha, bits, prior, s, one_sided=one_sided, model=model) == pytest.approx(want, rel=1e-8)


def _stratified(prior, n, scale, seed):
    """A random sample of the prior with one draw per probability stratum (lower-variance MC)."""
    g = torch.Generator().manual_seed(seed)
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
    if prior == "laplace":
        return -scale * torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())
    return scale * torch.special.ndtri(u)


class _EmpiricalMSE:
    """Exact empirical MSE of the 2^M-level grid for any alpha in O(2^M log N) via prefix sums."""

    def __init__(self, x):
        self.xs, _ = torch.sort(x.double())
        zero = torch.zeros(1, dtype=torch.float64)
        self.p = [torch.cat([zero, torch.cumsum(self.xs**k, 0)]) for k in (0, 1, 2)]

    def __call__(self, alpha, bits, one_sided, model="grid"):
        lv = torch.from_numpy(_grid(alpha, bits, one_sided, model))
        cut = torch.searchsorted(self.xs, (lv[1:] + lv[:-1]) / 2)
        idx = torch.cat([torch.tensor([0]), cut, torch.tensor([self.xs.numel()])])
        s0, s1, s2 = (p[idx[1:]] - p[idx[:-1]] for p in self.p)
        return float((s2 - 2 * lv * s1 + lv * lv * s0).sum() / self.xs.numel())


def _brute_force_argmin(f, center, points=25):
    """Grid over [0.5, 1.7] * center, then golden-section search in the bracket of the best point."""
    grid = center * np.linspace(0.5, 1.7, points)
    i = int(np.argmin([f(a) for a in grid]))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    r = (math.sqrt(5) - 1) / 2
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    while b - a > 1e-5 * center:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    return (a + b) / 2


@pytest.mark.parametrize("prior", ["laplace", "gauss"])
def test_alpha_matches_brute_force_empirical_minimum(prior):
    x = _stratified(prior, 2**22, scale=1.7, seed=0)
    for one_sided in (False, True):
        xx = x.abs() if one_sided else x
        emp = _EmpiricalMSE(xx)
        for bits in (2, 3, 4, 8):
            alpha = float(aciq_alpha(xx, bits, prior))  # fitted on the sample; one-sided auto-detected
            if bits == 3:  # the prefix-sum MSE is the element-wise MSE of the quantizer
                err = xx - _quantize(xx, alpha, bits, one_sided)
                assert emp(alpha, bits, one_sided) == pytest.approx(float((err**2).mean()), rel=1e-9)
            best = _brute_force_argmin(lambda a: emp(a, bits, one_sided), alpha)
            assert alpha == pytest.approx(best, rel=0.02), (prior, one_sided, bits)
            for model in ("signed_grid", "symmetric_grid", "narrow_grid") if not one_sided else ():
                alpha = float(aciq_alpha(xx, bits, prior, model=model))
                best = _brute_force_argmin(lambda a, m=model: emp(a, bits, False, m), alpha)
                assert alpha == pytest.approx(best, rel=0.02), (prior, model, bits)


def test_per_channel_statistics_and_range():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 2000, generator=g) * torch.tensor([[0.1], [1.0], [10.0]])  # (C, K)
    sigma = fit_prior(w, "gauss", ch_axis=0)
    assert sigma.shape == (3,)
    assert (sigma / torch.tensor([0.1, 1.0, 10.0])).tolist() == pytest.approx([1, 1, 1], abs=0.05)
    alpha = aciq_alpha(w, 4, "gauss", ch_axis=0)
    assert alpha.tolist() == pytest.approx((sigma * optimal_clip_ratio(4, "gauss")).tolist())
    lo, hi = aciq_range(w, 4, "gauss", ch_axis=0)
    assert torch.all(lo >= w.amin(1)) and torch.all(hi <= w.amax(1)) and torch.all(lo < 0)
    # the range stops at the data: at 8 bits alpha* (~3.9 sigma) exceeds max|w| of 2000 samples
    lo8, hi8 = aciq_range(w, 8, "gauss", ch_axis=0)
    assert torch.equal(hi8, w.amax(1)) or torch.all(hi8 <= w.amax(1))
    relu = torch.relu(w.T)  # (K, C) post-ReLU activations, channel axis 1
    lo, hi = aciq_range(relu, 3, "laplace", ch_axis=1)
    assert torch.all(lo == 0) and torch.all(hi > 0)
    # one-sided fit ignores the exact zeros: b is the mean of the positive part
    b = fit_prior(relu, "laplace", one_sided=True, ch_axis=1)
    assert b[2] == pytest.approx(float(relu[:, 2][relu[:, 2] > 0].mean()), rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gemmlowp_zero_exact_and_at_most_2_pow_bits_values(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(5, 300, generator=g) * 3  # (C, K)
    x[1] = x[1].abs() + 0.5  # all positive: range is nudged to include 0
    x[2] = -x[2].abs() - 0.5  # all negative
    x[3, :10] = 0.0
    scale, zp, qmin, qmax = gemmlowp_qparams(x.amin(1), x.amax(1), bits)
    assert (qmin, qmax) == (0, 2**bits - 1)
    assert zp.dtype == torch.int32 and torch.all((zp >= qmin) & (zp <= qmax))
    xq = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, qmin, qmax)
    zeros = torch.fake_quantize_per_channel_affine(torch.zeros_like(x), scale, zp, 0, qmin, qmax)
    assert torch.all(zeros == 0.0)  # 0.0 is exactly representable in every channel
    assert torch.all(xq[3, :10] == 0.0)
    for c in range(x.shape[0]):
        assert xq[c].unique().numel() <= 2**bits
    # every value lies in the nudged range, so the error is at most half a step
    assert torch.all((xq - x).abs() <= scale[:, None] / 2 + 1e-5)
    s, z, _, _ = gemmlowp_qparams(torch.tensor(0.0), torch.tensor(0.0), bits)  # degenerate range
    assert float(s) > 0 and int(z) == 0
    # applied with the core's fake_quantize: same result as torch's kernel
    torch.testing.assert_close(fake_quantize(x, scale, zp, qmin, qmax, ch_axis=0), xq)


def test_streaming_sums_match_the_whole_tensor():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 3, 4, 4, generator=g) * torch.tensor([0.5, 1.0, 4.0])[None, :, None, None] + 0.2
    sums = moment_sums(x[:32], ch_axis=1)
    for chunk in (x[32:40], x[40:]):  # uneven batches
        sums = merge_sums(sums, moment_sums(chunk, ch_axis=1))
    whole = moment_sums(x, ch_axis=1)
    for k in ("n", "s1", "s2", "n_pos", "s1_pos", "s2_pos", "lo", "hi"):
        torch.testing.assert_close(sums[k], whole[k])
    for prior, rel in (("gauss", 1e-9), ("laplace", 0.02)):  # Laplace b: batch-centered deviations
        lo, hi = aciq_range_from_sums(sums, 3, prior, model="signed_grid")
        lo_w, hi_w = aciq_range(x, 3, prior, ch_axis=1, model="signed_grid")
        torch.testing.assert_close(lo.float(), lo_w, rtol=rel, atol=0)
        torch.testing.assert_close(hi.float(), hi_w, rtol=rel, atol=0)


# ---------------------------------------------------------------- ACIQ observers (registry integration)


def _core_mse(x, alpha, bits, signed):
    lo = -alpha if signed else 0.0
    scale, zp, qmin, qmax = choose_qparams(torch.tensor(lo), torch.tensor(alpha), bits, symmetric=True, signed=signed)
    return float(((fake_quantize(x, scale, zp, qmin, qmax) - x) ** 2).mean())


@pytest.mark.parametrize("name,prior", [("aciq_laplace", "laplace"), ("aciq_gauss", "gauss")])
def test_aciq_observer_is_optimal_for_the_applied_core_quantizer(name, prior):
    x = _stratified(prior, 2**16, scale=0.3, seed=3).float()
    for one_sided in (False, True):
        xx = x.abs() if one_sided else x
        for bits in (2, 3, 4):
            obs = make_observer(QuantScheme.of(observer=name), bits, None)
            perm = torch.randperm(xx.numel(), generator=torch.Generator().manual_seed(bits))
            for chunk in xx[perm].chunk(4):  # streamed over (shuffled) calibration batches
                obs(chunk)
            scale, zp, qmin, qmax = obs.calculate_qparams()
            assert obs.is_signed() is not one_sided and float(obs.min_val) == (0.0 if one_sided else float(obs.min_val))
            alpha = float(obs.max_val)
            if not one_sided:
                assert float(obs.min_val) == pytest.approx(-alpha, rel=0.01)  # centered on a ~0 mean
            # alpha* agrees with the brute-force minimum of the MSE of choose_qparams + fake_quantize
            best = _brute_force_argmin(lambda a: _core_mse(xx, a, bits, not one_sided), alpha)
            assert alpha == pytest.approx(best, rel=0.02), (one_sided, bits)


def test_aciq_observer_per_channel_state_dict_and_quantizer():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(6, 4, 3, 3, generator=g) * torch.linspace(0.05, 1, 6)[:, None, None, None]
    scheme = QuantScheme.of(observer="aciq_laplace", granularity="per_channel")
    obs = make_observer(scheme, 4, True)
    assert isinstance(obs, ACIQObserver) and not obs.observed
    obs(w)
    lo, hi = aciq_range(w, 4, "laplace", ch_axis=0, model="signed_grid")
    torch.testing.assert_close(obs.min_val, lo)
    torch.testing.assert_close(obs.max_val, hi)
    fresh = make_observer(scheme, 4, True)
    fresh.load_state_dict(obs.state_dict())
    for a, b in zip(fresh.calculate_qparams(), obs.calculate_qparams()):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    # end to end: weights and (per-channel, post-ReLU) activations calibrated by ACIQ
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3))
    q = ModelQuantizer(
        model,
        ["0", "2"],
        scheme,
        QuantScheme.of(observer="aciq_gauss", granularity="per_channel", symmetric=False),
        [2, 4],
        [4, 8],
    )
    q.calibrate([torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)])
    assert q.act_qparams("2", 4).quant_min == 0  # post-ReLU input: unsigned, range [0, alpha]
    assert q.act_qparams("0", 4).quant_min < 0
    x = torch.randn(2, 3, 8, 8, generator=g)
    with q.applied({"0": (2, 4), "2": (4, 4)}):
        assert torch.isfinite(model(x)).all()


# ---------------------------------------------------------------- QuantScheme.aciq_model


def _laplace(shape, b, seed):
    """Laplace(0, b) by the inverse CDF, with one value at +-15 b so that every alpha* up to 8 bits
    (9.9 b) lies inside the observed range (ACIQ never extends the range beyond the data)."""
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5
    x = -b * torch.sign(u) * torch.log1p(-2 * u.abs())
    x.view(-1)[:2] = torch.tensor([15.0 * b, -15.0 * b])
    return x.float()


def _clip_multipliers(lo, hi, x):
    """(alpha / b) from both ends of an ACIQ range [mean - alpha, mean + alpha] of the data x."""
    xd = x.double()
    mean, b = xd.mean(), (xd - xd.mean()).abs().mean()
    return float((hi.double() - mean) / b), float((mean - lo.double()) / b)


BANNER_LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 8: 9.89}  # Banner et al. 2019, alpha* / b


def test_aciq_model_banner_through_observer_and_quantizer():
    bits = sorted(BANNER_LAPLACE)
    lin = torch.nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_laplace((64, 256), 0.05, seed=1))
    x = _laplace((512, 256), 0.7, seed=2)  # the layer's input, two-sided
    model = torch.nn.Sequential(lin)
    ranges = {}
    for name in ("banner", "signed_grid"):
        s = QuantScheme.of(observer="aciq_laplace", aciq_model=name)
        q = ModelQuantizer(model, ["0"], s, s, w_bits=bits, a_bits=bits)
        q.calibrate([x])
        st = q.state_dict()["qparams"]["0"]
        ranges[name] = {
            (kind, b): (st[kind][b]["min_val"], st[kind][b]["max_val"]) for kind in ("weight", "act") for b in bits
        }
        assert st["weight"][2]["min_val"] is not None
    w = lin.weight.detach()
    for (kind, b), (lo, hi) in ranges["banner"].items():
        data = w if kind == "weight" else x
        up, down = _clip_multipliers(lo, hi, data)
        # the paper's multipliers, and exactly the banner model of aciq.py
        assert up == pytest.approx(BANNER_LAPLACE[b], abs=0.01) and down == pytest.approx(BANNER_LAPLACE[b], abs=0.01)
        assert up == pytest.approx(optimal_clip_ratio(b, "laplace", model="banner"), rel=1e-5)
        sg_up, _ = _clip_multipliers(*ranges["signed_grid"][kind, b], data)
        # a symmetric scheme with symmetric_range applies the restricted grid, which the observer models
        assert sg_up == pytest.approx(optimal_clip_ratio(b, "laplace", model="narrow_grid"), rel=1e-5)
        assert not torch.equal(hi, ranges["signed_grid"][kind, b][1]), (kind, b)
    # the default is signed_grid, the observer path before the key existed
    assert QuantScheme.of().aciq_model == "signed_grid"
    assert make_observer(QuantScheme.of(observer="aciq_gauss"), 4).model == "narrow_grid"
    full = QuantScheme.of(observer="aciq_gauss", symmetric_range=False)
    assert make_observer(full, 4).model == "symmetric_grid"
    assert make_observer(QuantScheme.of(observer="aciq_gauss", symmetric=False), 4).model == "signed_grid"
    assert make_observer(QuantScheme.of(observer="aciq_gauss", aciq_model="grid"), 4).model == "grid"


def test_aciq_model_in_per_channel_bit_allocation():
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 32, generator=g) * torch.logspace(-1.5, 1.5, 16)[:, None])
    w = lin.weight.detach()
    alloc = {}
    for name in ("banner", "signed_grid"):
        s = QuantScheme.of(observer="aciq_laplace", granularity="per_channel", bit_allocation=True, aciq_model=name)
        q = ModelQuantizer(torch.nn.Sequential(lin), ["0"], s, QuantScheme.of(), w_bits=[3], a_bits=[8])
        q.calibrate([torch.randn(4, 32, generator=g)])
        cb = alloc[name] = q.channel_bits("0", "weight", 3)
        assert cb.bits.max() > cb.bits.min()
        model = "narrow_grid" if name == "signed_grid" else name  # the symmetric scheme's applied grid
        lo, hi = aciq_range(w, cb.bits, "laplace", ch_axis=0, model=model)  # re-clipped at alpha*(bits_c)
        torch.testing.assert_close(cb.min_val, lo, rtol=1e-6, atol=0)
        torch.testing.assert_close(cb.max_val, hi, rtol=1e-6, atol=0)
    assert torch.equal(alloc["banner"].bits, alloc["signed_grid"].bits)  # same ranges -> same bits
    assert not torch.allclose(alloc["banner"].max_val, alloc["signed_grid"].max_val, rtol=1e-3)


def test_aciq_model_validation_and_state():
    with pytest.raises(ValueError) as err:
        QuantScheme.of(observer="aciq_laplace", aciq_model="paper")
    msg = str(err.value)
    assert "QuantScheme.aciq_model" in msg and "'paper'" in msg
    assert all(f"'{m}'" in msg for m in ("signed_grid", "grid", "banner")), msg
    with pytest.raises(ValueError, match="model must be one of"):
        ACIQObserver(4, model="paper")
    s = QuantScheme.of(observer="aciq_gauss", aciq_model="banner")
    assert QuantScheme.from_dict(s.to_dict()) == s
    assert QuantScheme.from_dict({"observer": "aciq_gauss"}).aciq_model == "signed_grid"  # older dicts load
    # a state calibrated under one model does not load into a quantizer of another
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    q = ModelQuantizer(model, ["0"], s, QuantScheme.of(), [4], [8])
    q.calibrate([torch.randn(16, 8)])
    other = ModelQuantizer(model, ["0"], QuantScheme.of(observer="aciq_gauss"), QuantScheme.of(), [4], [8])
    with pytest.raises(ValueError, match="aciq_model"):
        other.load_state_dict(q.state_dict())
