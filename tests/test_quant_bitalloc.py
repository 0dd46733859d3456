"""Per-channel bit allocation meets the quota exactly and lowers the MSE; bias correction zeroes the
per-channel mean error (and variance correction the norm error). (Bias correction lives here because
it is the other per-channel post-processing piece of the same issue; entropy_bits is tested in
test_quant_entropy.py.)"""

import itertools

import numpy as np
import pytest
import torch

from mpqflow.quant import choose_qparams, fake_quantize
from mpqflow.quant.aciq import aciq_alpha, aciq_range
from mpqflow.quant.bias_correction import bias_correction_terms, correct_bias
from mpqflow.quant.bitalloc import (
    aciq_mse_fn,
    allocate_bits,
    allocate_bits_aciq,
    fake_quantize_per_channel_bits,
    uniform_mse_fn,
)


def _laplace(shape, scale, g):
    u = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())


def _quantize_channels(x, alpha, bits):
    """Uniform 2^M-level grid on [-alpha_c, alpha_c] per row of x (C, K), round to nearest."""
    n = (2.0 ** bits.double() - 1)[:, None]
    step = 2 * alpha[:, None] / n
    return -alpha[:, None] + torch.clamp(torch.round((x + alpha[:, None]) / step), torch.zeros_like(n), n) * step


@pytest.mark.parametrize("method", ["aciq", "optimal"])
def test_quota_met_exactly_and_bounds_respected(method):
    g = torch.Generator().manual_seed(0)
    for n, avg in ((64, 4), (64, 2.5), (10, 3.1), (7, 8), (33, 1)):
        alpha = torch.exp(3 * torch.randn(n, generator=g))  # ranges over orders of magnitude
        bits = allocate_bits(alpha, avg, method=method, min_bits=1, max_bits=8)
        assert bits.dtype == torch.int64 and bits.shape == (n,)
        assert int(bits.sum()) == round(avg * n)
        assert bits.min() >= 1 and bits.max() <= 8
    assert allocate_bits(torch.ones(6), 3).tolist() == [3] * 6
    with pytest.raises(ValueError, match="not an integer"):
        allocate_bits(torch.ones(3), 2.5)
    with pytest.raises(ValueError, match="outside"):
        allocate_bits(torch.ones(4), 9, max_bits=8)


def test_paper_rule_before_retargeting():
    # 2/3 rule: alpha ratio 8 -> bins ratio 4 -> 2 bits apart; the mean is 3 already
    bits = allocate_bits(torch.tensor([1.0, 8.0]), 3)
    assert bits.tolist() == [2, 4]


def test_optimal_is_integer_optimum_on_small_instance():
    g = torch.Generator().manual_seed(3)
    alpha = torch.exp(2 * torch.randn(5, generator=g))
    mse = aciq_mse_fn(alpha.numpy(), "laplace")
    table = np.stack([mse(m) for m in range(1, 9)], 1)  # (C, 8)
    best = min(
        (sum(table[c, b - 1] for c, b in enumerate(combo)), combo)
        for combo in itertools.product(range(1, 9), repeat=5)
        if sum(combo) == 15
    )
    got = allocate_bits(alpha, 3, max_bits=8, mse=mse, method="optimal")
    assert sum(table[c, b - 1] for c, b in enumerate(got.tolist())) == pytest.approx(best[0], rel=1e-12)
    paper = allocate_bits(alpha, 3, max_bits=8, mse=mse, method="aciq")
    assert (
        sum(table[c, b - 1] for c, b in enumerate(got.tolist()))
        <= sum(table[c, b - 1] for c, b in enumerate(paper.tolist())) + 1e-15
    )


@pytest.mark.parametrize("method", ["aciq", "optimal"])
def test_allocation_lowers_mse_vs_equal_bits(method):
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0], dtype=torch.float64)
    w = _laplace((8, 4000), scales[:, None], g)  # (C_out, K) weights, ranges over 3.5 decades
    for avg in (2, 3, 4):
        bits = allocate_bits_aciq(w, avg, "laplace", ch_axis=0, max_bits=8, method=method)
        assert int(bits.sum()) == 8 * avg and len(set(bits.tolist())) > 1
        equal = torch.full((8,), avg)
        alpha_mixed = torch.stack([aciq_alpha(w[c], int(b), "laplace") for c, b in enumerate(bits)])
        alpha_equal = aciq_alpha(w, avg, "laplace", ch_axis=0)
        mse_mixed = ((w - _quantize_channels(w, alpha_mixed, bits)) ** 2).mean()
        mse_equal = ((w - _quantize_channels(w, alpha_equal, equal)) ** 2).mean()
        assert mse_mixed < 0.5 * mse_equal, (avg, bits.tolist())
    # the uniform (no clipping) model also prefers wide channels
    alpha = w.abs().amax(1)
    bits = allocate_bits(alpha, 4, mse=uniform_mse_fn(alpha.numpy()), max_bits=8)
    assert bits[-1] > bits[0]


def test_per_channel_bits_through_the_core_fake_quant():
    g = torch.Generator().manual_seed(7)
    scales = torch.tensor([0.02, 0.1, 0.5, 2.0, 10.0, 0.3])
    w = _laplace((6, 3, 3, 3), scales[:, None, None, None], g).float()  # (C_out, C_in, kh, kw)
    bits = allocate_bits_aciq(w, 4, "laplace", ch_axis=0, min_bits=2, max_bits=8, method="optimal")
    assert int(bits.sum()) == 24
    lo, hi = aciq_range(w, bits, "laplace", ch_axis=0, model="signed_grid")
    w_q = fake_quantize_per_channel_bits(w, bits, lo, hi, 0, symmetric=True, signed=True)
    for c in range(6):
        assert w_q[c].unique().numel() <= 2 ** int(bits[c])
    lo4, hi4 = aciq_range(w, 4, "laplace", ch_axis=0, model="signed_grid")
    equal = fake_quantize_per_channel_bits(w, torch.full((6,), 4), lo4, hi4, 0, symmetric=True, signed=True)
    assert ((w_q - w) ** 2).mean() < 0.5 * ((equal - w) ** 2).mean()
    # one bit-width for all channels is the core's per-channel fake quant
    scale, zp, qmin, qmax = choose_qparams(lo4, hi4, 4, symmetric=True, signed=True)
    torch.testing.assert_close(equal, fake_quantize(w, scale, zp, qmin, qmax, ch_axis=0))
    # activations (N, C, H, W), unsigned affine per channel along axis 1
    x = torch.relu(torch.randn(4, 6, 5, 5, generator=g)) * scales[None, :, None, None]
    xq = fake_quantize_per_channel_bits(x, bits, x.amin((0, 2, 3)), x.amax((0, 2, 3)), 1, symmetric=False, signed=False)
    for c in range(6):
        assert xq[:, c].unique().numel() <= 2 ** int(bits[c])


def test_activation_channels_axis_1():
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(16, 4, 8, 8, generator=g) * torch.tensor([0.1, 1.0, 1.0, 10.0])[None, :, None, None])
    bits = allocate_bits_aciq(x, 4, "gauss", ch_axis=1)  # one-sided, detected from the data
    assert bits.shape == (4,) and int(bits.sum()) == 16
    assert bits[0] < bits[3] and bits[1] == bits[2]


@pytest.mark.parametrize("variance", [False, True])
def test_bias_correction_zeroes_channel_mean_error(variance):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 3, 3, 3, generator=g) * 0.2 + 0.05  # (C_out, C_in, kh, kw)
    step = 0.15
    w_q = torch.round(w / step) * step  # coarse grid: visible per-channel mean errors
    dims = (1, 2, 3)
    assert (w_q.mean(dims) - w.mean(dims)).abs().max() > 1e-4
    w_c = correct_bias(w, w_q, 0, variance=variance)
    assert w_c.dtype == w.dtype and w_c.shape == w.shape
    torch.testing.assert_close(w_c.mean(dims), w.mean(dims), atol=1e-6, rtol=0)
    centered = lambda t: (t - t.mean(dims, keepdim=True)).flatten(1).norm(dim=1)  # noqa: E731
    if variance:
        torch.testing.assert_close(centered(w_c), centered(w), atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(w_c - w_q, (w.mean(dims) - w_q.mean(dims)).view(-1, 1, 1, 1).expand_as(w))
    # other channel axis (e.g. a transposed layout), and a channel the quantizer made constant
    wt = w.transpose(0, 1).contiguous()
    w_qt = w_q.transpose(0, 1).contiguous()
    w_qt[:, 2] = 0.0
    w_ct = correct_bias(wt, w_qt, 1, variance=variance)
    torch.testing.assert_close(w_ct.mean((0, 2, 3)), wt.mean((0, 2, 3)), atol=1e-6, rtol=0)
    xi, _, _ = bias_correction_terms(wt, w_qt, 1, variance=variance)
    assert xi[2] == 1.0


@pytest.mark.parametrize("mode", ["bias", "bias_variance"])
def test_model_quantizer_bias_correction_option(mode):
    from mpqflow.quant import ModelQuantizer, QuantScheme, quantize_weight

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, 4),
    )
    act = QuantScheme.of(observer="ema_minmax", symmetric=False)
    for levels in ("uniform", "alq"):
        scheme = QuantScheme.of(granularity="per_tensor", bias_correction=mode, levels=levels)
        q = ModelQuantizer(model, ["0", "4"], scheme, act, [2, 4], [8])
        q.calibrate([torch.randn(4, 3, 5, 5)])
        for layer, dims in (("0", (1, 2, 3)), ("4", (1,))):
            w = dict(model.named_modules())[layer].weight.detach()
            w_q = q.quantized_weight(layer, 2)
            torch.testing.assert_close(w_q.mean(dims), w.mean(dims), atol=1e-6, rtol=0)
            plain = quantize_weight(
                w, q.weight_qparams(layer, 2), QuantScheme.of(granularity="per_tensor", levels=levels), 2
            )
            assert (plain.mean(dims) - w.mean(dims)).abs().max() > 1e-5  # there was a mean error to correct
            torch.testing.assert_close(w_q, correct_bias(w, plain, 0, variance=mode == "bias_variance"))
    with pytest.raises(ValueError, match="weights only"):
        ModelQuantizer(model, ["0"], QuantScheme.of(), QuantScheme.of(bias_correction=mode), [4], [8])
    with pytest.raises(ValueError, match="QuantScheme.bias_correction"):
        QuantScheme.of(bias_correction="yes")


# ---------------------------------------------------------------- bit allocation inside ModelQuantizer


def _spread_layer(seed: int = 0):
    """Linear(16 -> 16) whose output rows and input channels span ranges over 3 decades."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-1.5, 1.5, 16)
    lin = torch.nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 16, generator=g) * spread[:, None])
    x = torch.randn(512, 16, generator=g) * spread.flip(0)  # (N, C) inputs, channel scales reversed
    return torch.nn.Sequential(lin), x


def _quantized_output(net, x, alloc: bool, w: int | None, a: int | None, observer: str = "minmax"):
    from mpqflow.quant import ModelQuantizer, QuantScheme

    ws = QuantScheme.of(observer=observer, granularity="per_channel", bit_allocation=alloc)
    acts = QuantScheme.of(observer=observer, granularity="per_channel", bit_allocation=alloc)
    q = ModelQuantizer(net, ["0"], ws, acts, w_bits=[3], a_bits=[3])
    q.calibrate([x[:256], x[256:]])
    with q.applied({"0": (w, a)}), torch.no_grad():
        return net(x), q


@pytest.mark.parametrize("observer", ["minmax", "aciq_laplace"])
@pytest.mark.parametrize("part", ["weight", "act"])
def test_quantizer_bit_allocation_meets_quota_and_lowers_output_mse(part, observer):
    net, x = _spread_layer()
    with torch.no_grad():
        ref = net(x)
    opt = (3, None) if part == "weight" else (None, 3)
    eq, _ = _quantized_output(net, x, False, *opt, observer=observer)
    al, q = _quantized_output(net, x, True, *opt, observer=observer)
    cb = q.channel_bits("0", part, 3)
    assert cb is not None and cb.bits.numel() == 16
    assert cb.bits.sum().item() == 3 * 16  # quota met exactly
    assert cb.bits.max() > cb.bits.min()  # wide channels got more bits
    mse_eq, mse_al = ((eq - ref) ** 2).mean().item(), ((al - ref) ** 2).mean().item()
    assert mse_al < 0.8 * mse_eq, (mse_al, mse_eq)


def test_quantizer_bit_allocation_state_round_trip():
    from mpqflow.quant import ModelQuantizer, QuantScheme

    net, x = _spread_layer()
    out, q = _quantized_output(net, x, True, 3, 3)
    s = QuantScheme.of(granularity="per_channel", bit_allocation=True)
    q2 = ModelQuantizer(net, ["0"], s, s, w_bits=[3], a_bits=[3])
    q2.load_state_dict(q.state_dict())
    with q2.applied({"0": (3, 3)}), torch.no_grad():
        assert torch.equal(net(x), out)


def test_bit_allocation_needs_per_channel():
    from mpqflow.quant import QuantScheme

    with pytest.raises(ValueError, match="bit_allocation"):
        QuantScheme.of(bit_allocation=True)
