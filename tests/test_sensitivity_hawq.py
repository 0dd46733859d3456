"""HAWQ: Hutchinson traces agree with the exact (autograd) Hessian trace and stop at a stated
relative standard error, which they report truthfully; weight errors, Ω and its standard error."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import sensitivity_settings

from mpqflow.methods import hawq_omega, hawq_omega_se
from mpqflow.models import DigitsCNN
from mpqflow.sensitivity import OptionIndex, compute_batch
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


@pytest.fixture(scope="module")
def mlp():
    """A 4-layer tanh MLP (two candidate layers) and a batch of 64, with their exact Hessian blocks."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 10)
    )
    x = torch.randn(96, 16)
    ctx = make_context(net, x[:32], w_bits=(2, 4), a_bits=(8,))
    x, y = x[32:], torch.randint(0, 10, (64,))
    assert ctx.table.candidates == ("2", "4")
    return ctx, x, y, [_exact_block(ctx, x, y, layer) for layer in ctx.table.candidates]


def _probe_sd(H: torch.Tensor) -> float:
    """Standard deviation of one Rademacher probe vᵀHv: sqrt(2 Σ_{a≠b} H_ab²) (H symmetric)."""
    return float((2 * ((H**2).sum() - (H.diagonal() ** 2).sum())).sqrt())


def test_hutchinson_trace_within_5_percent_of_exact(mlp):
    ctx, x, y, blocks = mlp
    probes = 1500  # forced: min = max
    settings = sensitivity_settings(
        **{"hawq_max_probes": probes, "hawq_min_probes": probes, "hawq_seed": 1, "hawq_sketch": 0}
    )
    payload = compute_batch("hawq", ctx, x, y, settings)
    assert list(payload["probes_sum"]) == [probes, probes]
    for l, H in enumerate(blocks):
        exact = float(H.trace())
        stderr = _probe_sd(H) / probes**0.5  # 5% must be > 3 of them
        assert 3 * stderr < 0.05 * abs(exact)
        assert payload["trace_sum"][l] == pytest.approx(exact, rel=0.05), l
        # the reported SE is the sample estimate of that standard error
        assert payload["trace_var_sum"][l] ** 0.5 == pytest.approx(stderr, rel=0.15), l


@pytest.mark.parametrize("seed", range(4))
def test_stopping_rule_reaches_the_stated_precision(mlp, seed):
    """Plain Hutchinson with hawq_rel_se = 2 %: every layer stops on the rule (not the guard) with a
    reported SE at most 2 % of its trace; that SE is the true one (sd/√probes from the exact block,
    within 25 %) and the trace is within 4 true SEs (< 9 %) of the exact trace."""
    ctx, x, y, blocks = mlp
    settings = sensitivity_settings(
        **{"hawq_rel_se": 0.02, "hawq_min_probes": 30, "hawq_max_probes": 20000, "hawq_seed": seed}
    )
    settings["hawq_sketch"] = 0
    payload = compute_batch("hawq", ctx, x, y, settings)
    for l, H in enumerate(blocks):
        exact, probes = float(H.trace()), int(payload["probes_sum"][l])
        est, se = float(payload["trace_sum"][l]), float(payload["trace_var_sum"][l]) ** 0.5
        true_se = _probe_sd(H) / probes**0.5
        assert 30 <= probes < 20000 and se <= 0.02 * abs(est), (l, probes, se / abs(est))
        assert se == pytest.approx(true_se, rel=0.25), (l, probes)
        assert abs(est - exact) <= 4 * true_se, (l, est, exact, true_se)


@pytest.mark.parametrize("seed", range(4))
def test_deflated_traces_reach_the_stated_precision_with_fewer_probes(mlp, seed):
    """Hutch++ deflation (the default, 16 directions): the same stated precision, an estimate within
    4 reported SEs of the exact trace, in fewer probes than plain Hutchinson needs for it."""
    ctx, x, y, blocks = mlp
    settings = sensitivity_settings(
        **{"hawq_rel_se": 0.02, "hawq_min_probes": 30, "hawq_max_probes": 20000, "hawq_seed": seed}
    )
    payload = compute_batch("hawq", ctx, x, y, settings)
    for l, H in enumerate(blocks):
        exact, probes = float(H.trace()), int(payload["probes_sum"][l])
        est, se = float(payload["trace_sum"][l]), float(payload["trace_var_sum"][l]) ** 0.5
        assert 30 <= probes < 20000 and se <= 0.02 * abs(est), (l, probes, se / abs(est))
        assert abs(est - exact) <= 4 * se + 1e-5 * abs(exact), (l, est, exact, se)
        plain_needed = (_probe_sd(H) / (0.02 * abs(exact))) ** 2
        assert probes + 32 < plain_needed, (l, probes, plain_needed)


def test_small_blocks_are_traced_exactly():
    """A block with at most `sketch` weights is traced from its unit vectors: exact, SE 0, no probes."""
    torch.manual_seed(0)
    A = torch.randn(12, 12, dtype=torch.float64)
    H = A @ A.T
    w = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    t, s, p = _traces(0.5 * w @ H @ w, [w], sketch=16, seed=0)
    assert p == [0] and float(s[0]) == 0 and float(t[0]) == pytest.approx(float(H.trace()), rel=1e-12)


def test_hutchinson_minimum_guard_and_seed():
    torch.manual_seed(0)
    A = torch.randn(30, 30, dtype=torch.float64)
    H = A @ A.T + 30 * torch.eye(30, dtype=torch.float64)  # diagonally dominant: low probe variance
    w = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * w @ H @ w + w.sum()
    t1, s1, p1 = _traces(loss, [w], max_probes=5000, rel_se=0.02, min_probes=30, seed=3, sketch=0)
    t2, s2, p2 = _traces(0.5 * w @ H @ w + w.sum(), [w], max_probes=5000, rel_se=0.02, seed=3, sketch=0)
    assert p1 == p2 and torch.equal(t1, t2) and torch.equal(s1, s2)
    assert 30 <= p1[0] < 5000 and float(s1[0]) <= 0.02 * float(t1[0])
    # the rule needs (sd / (0.02 tr))^2 probes, give or take the sampling noise of sd
    need = (_probe_sd(H) / (0.02 * float(H.trace()))) ** 2
    assert max(30, 0.5 * need) <= p1[0] <= max(31, 2 * need), (p1, need)
    assert float(t1[0]) == pytest.approx(float(H.trace()), rel=0.1)
    _, _, p3 = _traces(0.5 * w @ H @ w, [w], max_probes=7, rel_se=1e-9, seed=3, sketch=0)
    assert p3 == [7]  # the guard
    _, _, p4 = _traces(0.5 * w @ H @ w, [w], max_probes=500, rel_se=10.0, min_probes=40, seed=3, sketch=0)
    assert p4 == [40]  # the minimum, however loose the target
    # a block with trace 0 but noisy probes (H = [[0, 1], [1, 0]]: vᵀHv = ±2) never reaches a
    # relative SE: the guard stops it; a block the loss is linear in is exactly 0 at the minimum
    u, w0 = (torch.zeros(2, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t5, s5, p5 = _traces(u[0] * u[1] + w0.sum(), [u, w0], max_probes=60, min_probes=30, seed=3, sketch=0)
    assert p5 == [60, 30] and float(s5[0]) > 0 and float(t5[1]) == 0 and float(s5[1]) == 0


def test_weight_err_and_omega(small):
    ctx, x, y = small
    payload = compute_batch("hawq", ctx, x, y, sensitivity_settings(hawq_max_probes=20))
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
    se = hawq_omega_se(payload, numel)
    np.testing.assert_allclose(se, omega * np.repeat(np.sqrt(payload["trace_var_sum"]) / payload["trace_sum"], idx.K))
    assert np.all(se > 0)
    with pytest.raises(ValueError, match="trace_var_sum"):
        hawq_omega_se({k: v for k, v in payload.items() if k != "trace_var_sum"}, numel)
    # same batch, same probes: reproducible
    again = compute_batch("hawq", ctx, x, y, sensitivity_settings(hawq_max_probes=20))
    np.testing.assert_array_equal(again["trace_sum"], payload["trace_sum"])
    assert ctx.quantizer.assignment == {}


def _traces(loss, weights, **kw):
    """hutchinson_traces with the schema's HAWQ defaults for the settings a test does not set."""
    defaults = {k.removeprefix("hawq_"): v for k, v in sensitivity_settings().items() if k.startswith("hawq_")}
    return hutchinson_traces(loss, weights, **{**defaults, **kw})
