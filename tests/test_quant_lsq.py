"""Tests of mpqflow.quant.lsq: the LSQ gradients against the paper's formula and finite differences,
the inits, and prepare_lsq on a small conv net initialised from a calibrated ModelQuantizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpqflow.quant import (
    LsqQuantizer,
    ModelQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantScheme,
    init_activations,
    lsq_assignment,
    lsq_layers,
    lsq_quantize,
    lsq_range,
    prepare_lsq,
)

LAYERS = ["stem", "conv", "fc"]
MIXED = {"stem": (8, None), "conv": (4, 4), "fc": (2, 8)}  # stem input raw (signed), the others post-ReLU


class Net(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):  # (B, 3, H, W)
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.conv(x))
        return self.fc(x.mean((2, 3)))  # (B, 5)


def _batches(n=3, bs=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, 6, 6, generator=g) for _ in range(n)]


def _calibrated(weight=None, w_bits=(2, 3, 4, 5, 6, 7, 8), a_bits=(2, 4, 8), seed=0):
    torch.manual_seed(seed)
    net = Net().eval()
    net.bn.running_mean.normal_(0, 0.1)
    q = ModelQuantizer(
        net,
        LAYERS,
        weight or QuantScheme.of(granularity="per_channel"),
        QuantScheme.of(observer="ema_minmax", symmetric=False),
        list(w_bits),
        list(a_bits),
    )
    q.calibrate(_batches())
    return net, q


# ---------------------------------------------------------------- the quantizer function


def test_lsq_range():
    assert lsq_range(2, True) == (-2, 1) and lsq_range(8, True) == (-128, 127)
    assert lsq_range(1, False) == (0, 1) and lsq_range(8, False) == (0, 255)
    for bits, signed in [(1, True), (0, False), (9, True), (9, False), (4.0, True), (True, False)]:
        with pytest.raises(ValueError, match="LSQ (un)?signed bits"):
            lsq_range(bits, signed)


def _grid_points(qn, qp, shape, gen):
    """x / s values away from rounding boundaries (|frac - 0.5| >= 0.1) and from the clamp edges (>= 0.1),
    about a third of them outside [Qn, Qp]."""
    v = torch.empty(shape, dtype=torch.float64).uniform_(qn - 3, qp + 3, generator=gen)
    frac = v - v.floor()
    bad = ((frac - 0.5).abs() < 0.1) | ((v - qn).abs() < 0.1) | ((v - qp).abs() < 0.1)
    return torch.where(bad, v.floor() + 0.25, v)  # frac 0.25: 0.25 from the integer, not near an edge either


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_step_gradient_is_the_papers(bits, signed, per_channel):
    """In float64: autograd = g * sum(w * dx̂/ds) with the paper's dx̂/ds, and = g * (FD - STE term).

    x̂ is piecewise linear in s; away from rounding boundaries and clamp edges, the central finite
    difference of f(s) = sum(w * x̂) is exact up to round-off and gives sum(w * round(x/s)) inside
    (Qn, Qp outside); the paper's gradient adds the STE term -x/s inside. Tolerance rtol = atol = 1e-7
    (round-off of the difference quotient is about 1e-8 here).
    """
    gen = torch.Generator().manual_seed(bits * 10 + signed + 2 * per_channel)
    qn, qp = lsq_range(bits, signed)
    c = 4 if per_channel else 1
    s = torch.rand(c, 1, dtype=torch.float64, generator=gen) * 0.2 + 0.05  # (C, 1)
    v = _grid_points(qn, qp, (c, 200), gen)  # (C, K)
    x, w = v * s, torch.randn(c, 200, dtype=torch.float64, generator=gen)
    step = (s if per_channel else s.reshape(())).clone().requires_grad_(True)
    x_ = x.clone().requires_grad_(True)
    g = 0.37
    (w * lsq_quantize(x_, step, qn, qp, g)).sum().backward()
    inside = (v > qn) & (v < qp)
    assert inside.any() and (~inside).any()
    paper = torch.where(inside, v.round() - v, torch.where(v <= qn, float(qn), float(qp)))
    expected = g * (w * paper).sum(1, keepdim=True)  # (C, 1)
    torch.testing.assert_close(
        step.grad, expected if per_channel else expected.sum().reshape(()), rtol=1e-10, atol=1e-12
    )
    assert torch.equal(x_.grad, w * inside)  # STE: 1 inside, 0 outside

    def f(s_):
        with torch.no_grad():
            return (w * lsq_quantize(x, s_, qn, qp, g)).sum(1, keepdim=True)  # (C, 1)

    h = 1e-5 * s  # moves x/s by <= 1.3e-3, far from the 0.1 margins
    fd = (f(s + h) - f(s - h)) / (2 * h)  # each channel's sum depends on its own step only
    if not per_channel:
        fd = (f(s.reshape(()) + h[0, 0]) - f(s.reshape(()) - h[0, 0])).sum() / (2 * h[0, 0])
    ste = (w * torch.where(inside, -v, 0.0)).sum(1, keepdim=True)
    ste = ste if per_channel else ste.sum()
    torch.testing.assert_close(step.grad.reshape(ste.shape), g * (fd.reshape(ste.shape) + ste), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("bits", range(2, 9))
def test_forward_is_bit_identical_to_torch_fake_quant(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    scale = torch.rand(6, generator=gen) * 0.05 + 1e-3
    zp = torch.zeros(6, dtype=torch.int32)
    for signed in (True, False):
        q = LsqQuantizer(bits, signed, channels=6)
        q.init_scale(scale)
        qn, qp = lsq_range(bits, signed)
        assert torch.equal(q(w), torch.fake_quantize_per_channel_affine(w, scale, zp, 0, qn, qp))
        codes = q.integer(w)
        assert codes.dtype == (torch.int8 if signed else torch.uint8)
        assert int(codes.int().min()) >= qn and int(codes.int().max()) <= qp
        assert torch.equal(codes.float() * scale.view(-1, 1, 1, 1), q(w))  # codes · step is the fake-quant value
        t = LsqQuantizer(bits, signed)
        t.init_scale(scale[0])
        assert torch.equal(t(w), torch.fake_quantize_per_tensor_affine(w, float(scale[0]), 0, qn, qp))


def test_grad_scale_per_tensor_per_channel_and_activations():
    """step.grad = (gradient with g = 1) / sqrt(N * Qp): N = numel, numel / C, features per sample."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(4, 3, 3, 3, generator=gen), torch.randn(5, 6, 4, 4, generator=gen)
    cases = [
        (LsqQuantizer(4, True), w, 108),
        (LsqQuantizer(4, True, channels=4), w, 27),
        (LsqQuantizer(3, False, per_sample=True), x, 96),
    ]
    for q, t, n in cases:
        q.init_lsq(t)
        q(t).pow(2).sum().backward()
        step = q.effective_step().detach().clone().requires_grad_(True)
        shaped = step.view(-1, 1, 1, 1) if q.channels else step
        lsq_quantize(t, shaped, q.qn, q.qp, 1.0).pow(2).sum().backward()
        torch.testing.assert_close(q.step.grad, step.grad / math.sqrt(n * q.qp), rtol=1e-6, atol=0)
        assert q.grad_scale(t) == pytest.approx(1 / math.sqrt(n * q.qp))


def test_inits_against_hand_values():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, -0.5, -0.5]])  # (C=2, K=4), 4 bits: Qp = 7, 2^(b-1) = 8
    q = LsqQuantizer(4, True, channels=2)
    q.init_lsq(w)  # 2 mean|w| / sqrt(Qp)
    torch.testing.assert_close(q.step.detach(), torch.tensor([5.0, 1.0]) / math.sqrt(7))
    t = LsqQuantizer(4, True)
    t.init_lsq(w)
    assert float(t.step.detach()) == pytest.approx(3 / math.sqrt(7))
    q.init_limpq(w)  # max(|mu - 3 sigma|, |mu + 3 sigma|) / 8, sigma the sample std
    s0 = (0.5 + 3 * math.sqrt(29 / 3)) / 8  # mu = -0.5, deviations +-1.5, +-3.5
    s1 = 3 * math.sqrt(1 / 3) / 8  # mu = 0, sigma^2 = 4 * 0.25 / 3
    torch.testing.assert_close(q.step.detach(), torch.tensor([s0, s1]))
    with pytest.raises(ValueError, match="signed weights"):
        LsqQuantizer(4, False).init_limpq(w)
    a = LsqQuantizer(4, None, per_sample=True)  # sign decided from the data
    a.init_lsq(w.abs())
    assert (
        a.signed is False
        and (a.qn, a.qp) == (0, 15)
        and float(a.step.detach()) == pytest.approx(2 * 1.5 / math.sqrt(15))
    )
    b = LsqQuantizer(4, None, per_sample=True)
    b.init_lsq(w)
    assert b.signed is True and (int(b.quant_min), int(b.quant_max)) == (-8, 7)
    with pytest.raises(ValueError, match="2 step"):
        q.init_scale(torch.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        q.init_scale(torch.tensor([1.0, 0.0]))


def test_uninitialized_and_step_guard():
    x = torch.linspace(-1, 1, 11)
    q = LsqQuantizer(4, True)
    with pytest.raises(RuntimeError, match="not initialized"):
        q(x)
    undecided = LsqQuantizer(4, None)
    undecided.init_scale(torch.tensor(0.1))
    with pytest.raises(RuntimeError, match="not initialized"):  # a step, but no sign yet
        undecided(x)
    q.init_scale(torch.tensor(0.1))
    ref = q(x)
    with torch.no_grad():
        q.step.fill_(-0.1)  # an update overshot through zero: |step| is used, the gradient still flows
    assert torch.equal(q(x), ref)
    q(x).sum().backward()
    assert q.step.grad is not None and float(q.step.grad) != 0
    with torch.no_grad():
        q.step.zero_()
    assert torch.isfinite(q(x)).all() and float(q.effective_step().detach()) > 0


# ---------------------------------------------------------------- prepare_lsq on a model


def test_calibrated_weights_identical_for_every_bit_width():
    net, q = _calibrated()
    for bits in range(2, 9):
        qnet = prepare_lsq(copy.deepcopy(net), {n: (bits, None) for n in LAYERS}, quantizer=q)
        for n in LAYERS:
            m = qnet.get_submodule(n)
            assert torch.equal(m.weight_quant(m.weight), q.quantized_weight(n, bits)), (n, bits)
    # per-tensor calibrated scales broadcast to per-channel steps: still identical
    net, q = _calibrated(weight=QuantScheme.of(), w_bits=(3,))
    qnet = prepare_lsq(copy.deepcopy(net), {"conv": (3, None)}, quantizer=q)
    assert torch.equal(qnet.conv.weight_quant(qnet.conv.weight), q.quantized_weight("conv", 3))


def test_prepare_keeps_parameters_and_reproduces_ptq_logits():
    net, q = _calibrated()
    x = _batches(1, seed=5)[0]
    with q.applied(MIXED):
        ptq = net(x)
    qnet = copy.deepcopy(net)
    params = {n: p for n, p in qnet.named_parameters()}
    assert prepare_lsq(qnet, MIXED, quantizer=q) is qnet
    assert isinstance(qnet.stem, QuantConv2d) and isinstance(qnet.fc, QuantLinear)
    assert all(p is params[n] for n, p in qnet.named_parameters() if "_quant." not in n)
    assert qnet.stem.act_quant is None and qnet.conv.act_quant.signed is False
    assert lsq_assignment(qnet) == MIXED and list(lsq_layers(qnet)) == LAYERS
    keys = {k for k in qnet.state_dict() if k.startswith("conv.")}
    quant = {f"conv.{p}_quant.{b}" for p in ("weight", "act") for b in ("step", "quant_min", "quant_max")}
    assert keys == {"conv.weight", "conv.bias"} | quant
    # post-ReLU inputs: the affine observer's zero point is 0, so the grids are the same -> same logits
    assert torch.equal(qnet(x), ptq)


def test_affine_signed_activation_gets_a_covering_symmetric_step():
    """The stem's input is signed: the affine PTQ grid has a zero point, LSQ's has none. Its step is the
    symmetric one covering the calibrated range, between the calibrated scale and twice it."""
    net, q = _calibrated()
    qnet = prepare_lsq(copy.deepcopy(net), {"stem": (None, 4)}, quantizer=q)
    qp_ = q.act_qparams("stem", 4)
    s_cal, zp = float(qp_.scale), int(qp_.zero_point)
    assert zp != 0 and qnet.stem.act_quant.signed is True
    lo, hi = (qp_.quant_min - zp) * s_cal, (qp_.quant_max - zp) * s_cal
    step = float(qnet.stem.act_quant.step.detach())
    assert step == pytest.approx(max(-lo, hi) / 7.5, rel=1e-6) and s_cal <= step <= 2 * s_cal
    x = torch.cat(_batches())
    err_lsq = (qnet.stem.act_quant(x) - x).pow(2).mean()
    err_ptq = (q.quantize_input("stem", x, 4) - x).pow(2).mean()
    assert err_lsq <= 4 * err_ptq  # the step is at most twice the calibrated scale
    # affine weights likewise: a symmetric step per channel covering each channel's calibrated range
    net, q = _calibrated(weight=QuantScheme.of(granularity="per_channel", symmetric=False), w_bits=(4,))
    qnet = prepare_lsq(copy.deepcopy(net), {"conv": (4, None)}, quantizer=q)
    p = q.weight_qparams("conv", 4)
    zp, scale = p.zero_point.double(), p.scale.double()
    expected = torch.maximum((zp - p.quant_min) * scale, (p.quant_max - zp) * scale) / 7.5
    assert (p.zero_point != 0).any()
    torch.testing.assert_close(qnet.conv.weight_quant.step.detach().double(), expected, rtol=1e-6, atol=0)


def test_lsq_init_and_init_activations():
    net, _ = _calibrated()
    qnet = prepare_lsq(copy.deepcopy(net), {"stem": (4, 8), "conv": (3, 4)}, weight_init="lsq")
    w = qnet.conv.weight.detach()
    torch.testing.assert_close(qnet.conv.weight_quant.step.detach(), 2 * w.abs().mean((1, 2, 3)) / math.sqrt(3))
    assert qnet.stem.act_quant.signed is None
    with pytest.raises(RuntimeError, match="not initialized"):
        qnet(_batches(1)[0])
    seen = {}
    hook = qnet.conv.register_forward_pre_hook(lambda m, a: seen.setdefault("conv", a[0].clone()))
    init_activations(qnet, _batches())
    hook.remove()
    assert qnet.stem.act_quant.signed is True and qnet.conv.act_quant.signed is False
    expected = 2 * seen["conv"].abs().mean() / math.sqrt(15)
    assert float(qnet.conv.act_quant.step.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert torch.isfinite(qnet(_batches(1)[0])).all()
    lim = prepare_lsq(copy.deepcopy(net), {"fc": (4, None)}, weight_init="limpq")
    fw = lim.fc.weight.detach()
    mu, sd = fw.mean(1), fw.std(1)
    torch.testing.assert_close(
        lim.fc.weight_quant.step.detach(), torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 8
    )


def _train(qnet, steps=15, lr=0.1, seed=3):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 3, 6, 6, generator=g), torch.randint(0, 5, (32,), generator=g)
    opt = torch.optim.SGD(qnet.parameters(), lr=lr, momentum=0.9)
    qnet.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(qnet(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return qnet.eval(), losses


def test_sgd_changes_steps_and_lowers_loss_and_state_dict_round_trip():
    net, q = _calibrated()
    assignment = {"stem": (8, None), "conv": (None, 4), "fc": (2, 8)}  # incl. FP parts; bn not quantized
    qnet = prepare_lsq(copy.deepcopy(net), assignment, quantizer=q)
    before = {k: v.clone() for k, v in qnet.state_dict().items() if k.endswith(".step")}
    assert qnet.conv.weight_quant is None and lsq_assignment(qnet) == assignment
    qnet, losses = _train(qnet)
    assert losses[-1] < 0.97 * losses[0]  # random labels, 2-bit fc: about 1.59 -> 1.50
    after = qnet.state_dict()
    assert set(before) == {"stem.weight_quant.step", "conv.act_quant.step", "fc.weight_quant.step", "fc.act_quant.step"}
    assert all(not torch.equal(before[k], after[k]) for k in before)
    x = _batches(1, seed=9)[0]
    # a fresh model: prepared from the quantizer, or with no init at all (signs adopted from the state)
    for kwargs in (dict(quantizer=q, weight_init=None), dict(weight_init=None)):
        fresh = prepare_lsq(Net().eval(), assignment, **kwargs)
        fresh.load_state_dict(qnet.state_dict())
        assert torch.equal(fresh(x), qnet(x)), kwargs
    wrong = prepare_lsq(Net().eval(), {**assignment, "fc": (3, 8)}, weight_init=None)
    with pytest.raises(RuntimeError, match="fc.weight_quant.quant_min/max"):
        wrong.load_state_dict(qnet.state_dict())
    signed = prepare_lsq(Net().eval(), assignment, weight_init=None, act_signed={"conv": True})
    with pytest.raises(RuntimeError, match="conv.act_quant.quant_min/max"):
        signed.load_state_dict(qnet.state_dict())


def test_bad_inputs_are_refused_naming_the_layer():
    net, q = _calibrated(w_bits=(4,), a_bits=(8,))
    fresh = copy.deepcopy(net)
    cases = [
        ({"conv": (4, 8), "block.nope": (4, 8)}, {}, "'block.nope', which is not a"),
        ({"bn": (4, 8)}, {}, "'bn' is a BatchNorm2d"),
        ({"conv": (3, 8)}, {}, "'conv': the quantizer has no weight qparams at 3 bits"),
        ({"conv": (4, 4)}, {}, "'conv': the quantizer has no act qparams at 4 bits"),
        ({"conv": (4,)}, {}, "assignment of 'conv' must be"),
        ({"conv": (4, 8)}, dict(weight_init="lsq", per_channel=True, act_signed={"fc": True}), "act_signed names"),
        ({"fc": (1, None)}, dict(weight_init="lsq", quantizer=None), "layer 'fc': LSQ signed bits"),
        ({"fc": (None, 9)}, dict(weight_init="lsq", quantizer=None), "layer 'fc': LSQ unsigned bits"),
        ({"conv": (4, 8)}, dict(quantizer=None), "needs the calibrated quantizer"),
        ({"conv": (4, 8)}, dict(weight_init="mse"), "weight_init must be"),
    ]
    for assignment, kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            prepare_lsq(fresh, assignment, **{"quantizer": q, **kwargs})
        assert not lsq_layers(fresh)  # nothing swapped when anything is refused
    other = ModelQuantizer(fresh, ["conv"], QuantScheme.of(), QuantScheme.of(), [4], [8])
    with pytest.raises(ValueError, match="not calibrated"):
        prepare_lsq(fresh, {"conv": (4, 8)}, quantizer=other)
    other.calibrate(_batches(1))
    with pytest.raises(ValueError, match="layer 'fc' is not among the quantizer's layers"):
        prepare_lsq(fresh, {"fc": (4, 8)}, quantizer=other)
    with q.applied({"conv": (4, 8)}):
        with pytest.raises(ValueError, match=r"assignment applied \(\['conv'\]\)"):
            prepare_lsq(fresh, {"conv": (4, 8)}, quantizer=q)
    with torch.no_grad():
        fresh.conv.weight.add_(0.01)
    with pytest.raises(ValueError, match="'conv': weights differ"):
        prepare_lsq(fresh, {"conv": (4, 8)}, quantizer=q)
    prepare_lsq(fresh, {"stem": (4, 8)}, quantizer=q)
    with pytest.raises(ValueError, match="'stem' is a QuantConv2d"):
        prepare_lsq(fresh, {"stem": (4, 8)}, quantizer=q)
    h = fresh.fc.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="'fc' has hooks"):
        prepare_lsq(fresh, {"fc": (4, 8)}, quantizer=q)
    h.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_follow_the_device():
    net, q = _calibrated()
    qnet = prepare_lsq(copy.deepcopy(net).cuda(), MIXED, quantizer=q)
    assert all(p.is_cuda for p in qnet.parameters()) and all(b.is_cuda for b in qnet.buffers())
    x = _batches(1)[0]
    with q.applied(MIXED):
        ptq = net(x)
    torch.testing.assert_close(qnet(x.cuda()).cpu(), ptq, rtol=1e-4, atol=1e-5)
    for n in LAYERS:
        m = qnet.get_submodule(n)
        assert torch.equal(m.weight_quant(m.weight).cpu(), q.quantized_weight(n, MIXED[n][0]))
    qnet.train()
    qnet(x.cuda()).sum().backward()
    assert qnet.conv.act_quant.step.grad.is_cuda and qnet.fc.weight_quant.step.grad.abs().sum() > 0
