"""MPQCO's vmap per-sample gradients give what a plain batch-size-1 autograd loop gives."""

import numpy as np
import pytest
import torch

from mpqflow.models import build_model
from mpqflow.sensitivity import OptionIndex, compute_batch
from mpqflow.sensitivity.common import make_context

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def _loop_sq_sum(ctx, x, y):
    """Σ_n (<ΔW, ∇_W z_n> / z_n)^2 with one autograd backward per sample."""
    idx = OptionIndex.from_table(ctx.table)
    modules = dict(ctx.net.named_modules())
    weights = [modules[l].weight for l in idx.layers]
    out = np.zeros(idx.n)
    with ctx.quantizer.applied(ctx.table.fixed):
        for n in range(x.shape[0]):
            z = ctx.net(x[n : n + 1])[0, y[n]]
            grads = torch.autograd.grad(z, weights)
            z = z.detach()
            for i in range(idx.n):
                l, k = divmod(i, idx.K)
                dw = ctx.quantizer.quantized_weight(idx.layers[l], idx.options[k][0]) - weights[l].detach()
                out[i] += (float((dw * grads[l]).sum()) / float(z)) ** 2
    return out


@pytest.mark.parametrize("arch", ["digits_cnn", "resnet20"])
def test_mpqco_matches_batch_size_one_loop(arch):
    torch.manual_seed(0)
    net = build_model(arch, 1, 10)
    x = torch.randn(40, 1, 8, 8)
    ctx = make_context(net, x[:32], w_bits=(2, 4), a_bits=(4, 8))
    xb, yb = x[32:], torch.randint(0, 10, (8,))
    # small chunks: the per-sample gradients are computed in several vmap calls
    payload = compute_batch("mpqco", ctx, xb, yb, {"mpqco_chunk": 3})
    assert int(payload["count"]) == 8
    want = _loop_sq_sum(ctx, xb, yb)
    np.testing.assert_allclose(payload["sq_sum"], want, rtol=1e-4)
    idx = OptionIndex.from_table(ctx.table)
    sq = payload["sq_sum"].reshape(idx.L, idx.K)
    # weights only: options with the same w_bits share one value; 2 bits are worse than 4 overall
    w_of = [o[0] for o in idx.options]
    for a in range(idx.K):
        for b in range(idx.K):
            if w_of[a] == w_of[b]:
                np.testing.assert_array_equal(sq[:, a], sq[:, b])
    assert sq[:, w_of.index(2)].sum() > sq[:, w_of.index(4)].sum()
    assert ctx.quantizer.assignment == {}
