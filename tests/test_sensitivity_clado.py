"""CLADO: the fast fx engine gives the reference engine's numbers (ResNet-20 on digits, torchvision
ResNet-18, a model fx cannot trace, plain perturbation callbacks); G's structure; second-order
exactness on a model whose loss is exactly quadratic in the weights."""

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import sensitivity_settings

from mpqflow.methods import clado_matrix
from mpqflow.models import build_model
from mpqflow.sensitivity import OptionIndex, compute_batch
from mpqflow.sensitivity.common import make_context
from mpqflow.sensitivity.fx_engine import FxGraph, NotTraceable, pairwise_fx, pairwise_reference

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


QUIET = sensitivity_settings(progress=False)


def _compare(ctx, x, y, tol=1e-5):
    ref = compute_batch("clado", ctx, x, y, {**QUIET, "clado_engine": "reference"})
    fast = compute_batch("clado", ctx, x, y, {**QUIET, "clado_engine": "fast"})
    B = x.shape[0]
    assert set(ref) == set(fast)
    for k in ref:
        assert np.max(np.abs(np.asarray(ref[k]) - np.asarray(fast[k]))) / B <= tol, k
    return ref, fast


@pytest.fixture(scope="module")
def resnet20_ctx():
    torch.manual_seed(0)
    net = build_model("resnet20", 1, 10)
    x = torch.randn(48, 1, 8, 8)
    return make_context(net, x[:32], w_bits=(2, 8), a_bits=(8,)), x[32:], torch.randint(0, 10, (16,))


def test_fast_equals_reference_resnet20(resnet20_ctx):
    ctx, x, y = resnet20_ctx
    ref, fast = _compare(ctx, x, y)
    idx = OptionIndex.from_table(ctx.table)
    assert idx.L == 20 and idx.K == 2
    assert ref["ce_pair_sum"].shape == (40, 40)
    # the quantizer is left as it was (nothing applied)
    assert ctx.quantizer.assignment == {}
    # the single passes really perturb the loss, the 8-bit ones much less than the 2-bit ones
    d = np.abs(ref["ce_single_sum"] - ref["ce_base_sum"]).reshape(20, 2)
    assert np.all(d[:, 1] > 0) and d[:, 1].mean() > d[:, 0].mean()


def test_fast_equals_reference_torchvision_resnet18():
    torch.manual_seed(1)
    net = build_model("torchvision:resnet18", 3, 10)
    x = torch.randn(10, 3, 32, 32)
    full = make_context(net, x[:8], w_bits=(2,), a_bits=(4, 8))
    # a subset: a block conv, a downsample conv (residual branch that `+=` writes into), late convs
    cands = ["layer1.0.conv2", "layer2.0.downsample.0", "layer2.0.conv2", "layer3.1.conv1", "layer4.1.conv2"]
    assert set(cands) <= set(full.table.candidates)
    ctx = make_context(net, x[:8], w_bits=(2,), a_bits=(4, 8), candidates=cands)
    _compare(ctx, x[8:], torch.tensor([3, 7]))


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        if h.sum() > -1e9:
            h = F.relu(self.b(h))
        return self.d(F.relu(self.c(h)))


def test_untraceable_model_falls_back_to_reference(caplog):
    torch.manual_seed(2)
    net = _Branchy()
    x = torch.randn(12, 5)
    ctx = make_context(net, x, w_bits=(2, 4), a_bits=(8,))
    with pytest.raises(NotTraceable):
        FxGraph(net, ctx.table.candidates)
    with caplog.at_level(logging.WARNING, logger="mpqflow"):
        _compare(ctx, x, torch.randint(0, 3, (12,)))
    assert any("reference engine" in r.message for r in caplog.records)


class _Residual(nn.Module):
    """Residual branches, in-place ReLUs (one on a value another layer has read), a view that
    depends on the batch size."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = (nn.Linear(6, 6) for _ in range(4))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.l1(x)
        r = self.l2(h)  # reads h before the in-place ReLU below overwrites it
        h = self.act(h)
        r += self.l3(h)
        return self.l4(self.act(r)).view(x.shape[0], -1)


def test_fx_engine_on_plain_callbacks():
    torch.manual_seed(3)
    net = _Residual().eval()
    x = torch.randn(7, 6)
    layers = ["l1", "l2", "l3", "l4"]
    K = 3
    saved = {l: getattr(net, l).weight.data.clone() for l in layers}
    noise = {(l, k): 0.1 * (k + 1) * torch.randn_like(saved[l]) for l in layers for k in range(K)}

    def activate(choice):
        for li, l in enumerate(layers):
            getattr(net, l).weight.data = saved[l] + noise[l, choice[li]] if li in choice else saved[l]

    def make_head(base):
        def head(out, M):
            return out.reshape(M, -1, out.shape[-1]).double().sum(1)  # (M, 6): column sums

        return head

    ref = pairwise_reference(net, x, layers, K, activate, make_head, progress=False)
    for stack in (True, False):
        fast = pairwise_fx(net, x, layers, K, activate, make_head, stack=stack, progress=False)
        for a, b in zip(ref, fast):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # weights are back to FP
    assert all(torch.equal(getattr(net, l).weight.data, saved[l]) for l in layers)


def test_G_structure(resnet20_ctx):
    ctx, x, y = resnet20_ctx
    idx = OptionIndex.from_table(ctx.table)
    payload = compute_batch("clado", ctx, x[:4], y[:4], QUIET)
    for kind in ("ce", "kl"):
        pair = payload[f"{kind}_pair_sum"]
        assert np.array_equal(pair, pair.T)
        G = clado_matrix(payload, kind, idx.layer_of)
        assert np.array_equal(G, G.T)
        same = idx.layer_of[:, None] == idx.layer_of[None, :]
        assert np.all(G[same & ~np.eye(idx.n, dtype=bool)] == 0)
        assert np.all(pair[same] == 0)
        base = payload["ce_base_sum"] if kind == "ce" else 0.0
        np.testing.assert_allclose(np.diag(G), 2 * (payload[f"{kind}_single_sum"] - base) / 4)
        i, j = 0, idx.K + 1
        want = (pair[i, j] - payload[f"{kind}_single_sum"][i] - payload[f"{kind}_single_sum"][j] + base) / 4
        assert G[i, j] == pytest.approx(want)
    assert np.all(payload["kl_single_sum"] >= -1e-6)


class _Additive(nn.Module):
    """Output linear in all weights jointly: out = A x + B x + C x + c, so squared error is quadratic."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 3, bias=False), nn.Linear(6, 3, bias=False)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


def _squared_error(logits, y):
    return ((logits - F.one_hot(y, logits.shape[-1]).to(logits.dtype)) ** 2).sum(-1)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_second_order_exactness(engine):
    torch.manual_seed(4)
    net = _Additive().double()
    # inputs on the 8-bit activation grid (range 0..255, scale 1): input quantization is the identity
    x = torch.randint(0, 256, (24, 6)).double()
    x[0, 0], x[1, 0] = 0.0, 255.0
    y = torch.randint(0, 3, (24,))
    ctx = make_context(net, x, w_bits=(2, 4), a_bits=(8,), fix_first_last=False)
    assert ctx.table.candidates == ("a", "b", "c") and not ctx.table.fixed
    payload = compute_batch("clado", ctx, x, y, {**QUIET, "clado_engine": engine, "loss_fn": _squared_error})
    idx = OptionIndex.from_table(ctx.table)
    G = clado_matrix(payload, "ce", idx.layer_of)

    W = [getattr(net, l).weight.detach() for l in idx.layers]
    sizes = [w.numel() for w in W]

    def mean_loss(flat):
        ws = torch.split(flat, sizes)
        out = sum(F.linear(x, w.reshape(W[0].shape)) for w in ws) + net.c.bias
        return _squared_error(out, y).mean()

    flat = torch.cat([w.reshape(-1) for w in W])
    H = torch.autograd.functional.hessian(mean_loss, flat)  # (3*18, 3*18)
    g = torch.autograd.functional.jacobian(mean_loss, flat)
    offs = np.cumsum([0] + sizes)
    d = []
    for i in range(idx.n):
        l, k = divmod(i, idx.K)
        v = torch.zeros_like(flat)
        v[offs[l] : offs[l + 1]] = (ctx.quantizer.quantized_weight(idx.layers[l], idx.options[k][0]) - W[l]).reshape(-1)
        d.append(v)
    D = torch.stack(d)  # (n, P)
    want = (D @ H @ D.T).numpy()
    want[np.diag_indices(idx.n)] += 2 * (D @ g).numpy()  # G[i,i] = 2(L(i) - L0) = 2 g.d + d H d
    want[(idx.layer_of[:, None] == idx.layer_of[None, :]) & ~np.eye(idx.n, dtype=bool)] = 0
    np.testing.assert_allclose(G, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    cross = idx.layer_of[:, None] != idx.layer_of[None, :]
    # cross terms are not trivially zero (against the median effect: the ternary 2-bit grid zeroes most
    # weights, so the largest effect dwarfs everything)
    assert np.abs(G[cross]).max() > 0.1 * np.median(np.abs(np.diag(want)))
