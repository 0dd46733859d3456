"""HAWQ: Hutchinson traces agree with the exact (autograd) Hessian trace; weight errors and Ω."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpqflow.models import DigitsCNN
from mpqflow.sensitivity import OptionIndex, compute_batch, hawq_omega
from mpqflow.sensitivity.common import make_context
from mpqflow.sensitivity.hawq import hutchinson_traces

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    net = DigitsCNN(1, 10, width=4)
    x = torch.randn(48, 1, 8, 8)
    ctx = make_context(net, x[:32], w_bits=(2, 4), a_bits=(8,))
    return ctx, x[32:], torch.randint(0, 10, (16,))


def _exact_block(ctx, x, y, layer):
    """Exact Hessian block of the summed loss w.r.t. `layer`'s weight (base model), (P, P)."""
    from torch.func import functional_call

    net = ctx.net
    with ctx.quantizer.applied(ctx.table.fixed):
        params = {k: v.detach() for k, v in net.named_parameters()}

        def loss(w):
            out = functional_call(net, {**params, f"{layer}.weight": w}, (x,))
            return F.cross_entropy(out, y, reduction="sum")

        H = torch.autograd.functional.hessian(loss, params[f"{layer}.weight"])
    P = params[f"{layer}.weight"].numel()
    return H.reshape(P, P).double()


def test_hutchinson_trace_within_5_percent_of_exact():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 10)
    )
    x = torch.randn(96, 16)
    ctx = make_context(net, x[:32], w_bits=(2, 4), a_bits=(8,))
    x, y = x[32:], torch.randint(0, 10, (64,))
    assert ctx.table.candidates == ("2", "4")
    probes = 1500
    payload = compute_batch("hawq", ctx, x, y, {"hawq_max_probes": probes, "hawq_tol": 1e-12, "hawq_seed": 1})
    for l, layer in enumerate(ctx.table.candidates):
        H = _exact_block(ctx, x, y, layer)
        exact = float(H.trace())
        # the estimator's own standard error: sqrt(2 Σ_{a≠b} H_ab² / probes); 5% must be > 3 of them
        stderr = float(((2 * ((H**2).sum() - (H.diagonal() ** 2).sum())) / probes).sqrt())
        assert 3 * stderr < 0.05 * abs(exact)
        assert payload["trace_sum"][l] == pytest.approx(exact, rel=0.05), layer


def test_hutchinson_stops_at_tolerance_and_is_seeded():
    torch.manual_seed(0)
    A = torch.randn(30, 30, dtype=torch.float64)
    H = A @ A.T + 30 * torch.eye(30, dtype=torch.float64)  # diagonally dominant: low probe variance
    w = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * w @ H @ w + w.sum()
    t1, p1 = hutchinson_traces(loss, [w], max_probes=500, tol=1e-3, seed=3)
    t2, p2 = hutchinson_traces(0.5 * w @ H @ w + w.sum(), [w], max_probes=500, tol=1e-3, seed=3)
    assert p1 == p2 and p1[0] < 500 and torch.equal(t1, t2)
    assert float(t1[0]) == pytest.approx(float(H.trace()), rel=0.1)
    _, p3 = hutchinson_traces(0.5 * w @ H @ w, [w], max_probes=7, tol=1e-12, seed=3)
    assert p3 == [7]


def test_weight_err_and_omega(small):
    ctx, x, y = small
    payload = compute_batch("hawq", ctx, x, y, {"hawq_max_probes": 20})
    idx = OptionIndex.from_table(ctx.table)
    modules = dict(ctx.net.named_modules())
    for i in range(idx.n):
        l, k = divmod(i, idx.K)
        w = modules[idx.layers[l]].weight.detach()
        want = float(((ctx.quantizer.quantized_weight(idx.layers[l], idx.options[k][0]) - w) ** 2).sum())
        assert payload["weight_err"][i] == pytest.approx(want, rel=1e-6)
    numel = [ctx.table.numel[l] for l in idx.layers]
    omega = hawq_omega(payload, numel)
    want = np.repeat(payload["trace_sum"] / 16 / np.asarray(numel), idx.K) * payload["weight_err"]
    np.testing.assert_allclose(omega, want)
    # same batch, same probes: reproducible
    again = compute_batch("hawq", ctx, x, y, {"hawq_max_probes": 20})
    np.testing.assert_array_equal(again["trace_sum"], payload["trace_sum"])
    assert ctx.quantizer.assignment == {}
