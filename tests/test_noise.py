"""Standard errors of every sensitivity (issue 15): pooled exactly, equal to the SE computed from all
samples of the union; noise-aware CLADO's shrinkage; old files without second moments are refused."""

import numpy as np
import pytest
import torch
from conftest import sensitivity_settings

from mpqflow.artifacts import FORMAT_VERSION, load_batch_file, pool_batch_files, save_batch_file, save_npz
from mpqflow.methods import (
    clado_diff_se,
    clado_matrix,
    clado_matrix_se,
    hawq_omega_se,
    mean_se,
    method_objective,
    mpqco_se,
    noise_aware_matrix,
    psd_project,
    soft_threshold,
)
from mpqflow.models import DigitsCNN
from mpqflow.sensitivity import OptionIndex, batch_meta, compute_batch
from mpqflow.sensitivity.common import make_context

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def tiny():
    """A calibrated tiny CNN (2 candidate layers x w2/w4 x a8) and 24 held-out samples."""
    torch.manual_seed(0)
    net = DigitsCNN(1, 10, width=4)
    x = torch.randn(40, 1, 8, 8)
    ctx = make_context(net, x[:16], w_bits=(2, 4), a_bits=(8,))
    return ctx, x[16:], torch.randint(0, 10, (24,))


def _files(ctx, x, y, estimator, tmp_path, sizes=(10, 14)):
    """Per-batch files of two unequal batches, and the samples in order."""
    settings = sensitivity_settings(progress=False, hawq_max_probes=40)
    paths, start = [], 0
    for b, size in enumerate(sizes):
        payload = compute_batch(estimator, ctx, x[start : start + size], y[start : start + size], settings)
        paths.append(str(tmp_path / f"batch_{b}.npz"))
        save_batch_file(paths[-1], payload, batch_meta(ctx, estimator, settings))
        start += size
    return paths


def _per_sample(ctx, x, y, estimator, value):
    """value(payload of sample n alone) for every sample: (N, ...)."""
    return np.stack(
        [
            value(compute_batch(estimator, ctx, x[i : i + 1], y[i : i + 1], sensitivity_settings(progress=False)))
            for i in range(len(y))
        ]
    )


def test_mean_se_is_the_textbook_standard_error():
    v = np.random.default_rng(0).normal(3.0, 2.0, size=(50, 3))
    np.testing.assert_allclose(mean_se(v.sum(0), (v**2).sum(0), 50), v.std(0, ddof=1) / np.sqrt(50), rtol=1e-10)
    assert mean_se(np.array([2.0]), np.array([4.0]), 1)[0] == 0  # one sample: no variance estimate


def test_clado_pooled_se_equals_the_se_of_the_union(tiny, tmp_path):
    ctx, x, y = tiny
    pooled = pool_batch_files(_files(ctx, x, y, "clado", tmp_path))
    layer_of = OptionIndex.from_table(ctx.table).layer_of
    for kind in ("ce", "kl"):
        # a sample alone runs through float32 convolutions with another batch shape: its losses differ
        # from the batched ones by ~1e-8, which G's differences of losses amplify (KL entries of 1e-6
        # by up to 2 %): compared within 2 %, the entries near 0 within 0.1 % of the largest
        g = _per_sample(ctx, x, y, "clado", lambda p: clado_matrix(p, kind, layer_of))  # (N, n, n)
        G = g.mean(0)
        np.testing.assert_allclose(clado_matrix(pooled, kind), G, rtol=2e-2, atol=1e-3 * np.abs(G).max())
        direct = g.std(0, ddof=1) / np.sqrt(len(g))
        np.testing.assert_allclose(clado_matrix_se(pooled, kind), direct, rtol=2e-2, atol=1e-3 * direct.max())
        assert (direct[layer_of[:, None] != layer_of[None, :]] > 0).all()  # cross-layer entries are noisy


def test_clado_paired_difference_se_equals_the_se_of_the_union(tiny, tmp_path):
    """SE of G[i, i] - G[j, j] within a layer from the pooled dsq sums = the SE of the per-sample
    differences over the union; it is far below the marginal SEs (the options share most noise)."""
    ctx, x, y = tiny
    pooled = pool_batch_files(_files(ctx, x, y, "clado", tmp_path))
    layer_of = OptionIndex.from_table(ctx.table).layer_of
    same = layer_of[:, None] == layer_of[None, :]
    for kind in ("ce", "kl"):
        g = _per_sample(ctx, x, y, "clado", lambda p: np.diag(clado_matrix(p, kind, layer_of)))  # (N, n)
        d = g[:, :, None] - g[:, None, :]  # (N, n, n)
        direct = np.where(same, d.std(0, ddof=1) / np.sqrt(len(d)), 0.0)
        got = clado_diff_se(pooled, kind)
        np.testing.assert_allclose(got, direct, rtol=2e-2, atol=1e-3 * direct.max())
        assert (got[~same] == 0).all() and (np.diag(got) == 0).all()
    marginal = np.diag(clado_matrix_se(pooled, "ce"))
    assert clado_diff_se(pooled, "ce")[0, 1] < max(marginal[0], marginal[1])


def test_mpqco_pooled_se_equals_the_se_of_the_union(tiny, tmp_path):
    ctx, x, y = tiny
    pooled = pool_batch_files(_files(ctx, x, y, "mpqco", tmp_path))
    s2 = _per_sample(ctx, x, y, "mpqco", lambda p: p["sq_sum"])  # (N, n): s_n² per sample
    np.testing.assert_allclose(pooled["sq_sum"] / pooled["count"], s2.mean(0), rtol=1e-4)
    np.testing.assert_allclose(mpqco_se(pooled), s2.std(0, ddof=1) / np.sqrt(len(s2)), rtol=1e-4)


def test_hawq_pooled_se_adds_variances(tiny, tmp_path):
    ctx, x, y = tiny
    paths = _files(ctx, x, y, "hawq", tmp_path)
    one, two = (load_batch_file(p) for p in paths)
    pooled = pool_batch_files(paths)
    numel = [ctx.table.numel[l] for l in ctx.table.candidates]
    want = np.sqrt(hawq_omega_se(one, numel) ** 2 * 10**2 + hawq_omega_se(two, numel) ** 2 * 14**2) / 24
    np.testing.assert_allclose(hawq_omega_se(pooled, numel), want, rtol=1e-10)
    np.testing.assert_array_equal(pooled["probes_sum"], one["probes_sum"] + two["probes_sum"])


def test_shrinkage_keeps_noise_free_entries(tiny):
    """Every sample the same (a duplicated batch): no sample noise, so clado_na is clado exactly."""
    ctx, x, y = tiny
    dup = compute_batch("clado", ctx, x[:1].repeat(12, 1, 1, 1), y[:1].repeat(12), sensitivity_settings(progress=False))
    meta = batch_meta(ctx, "clado", {})
    pooled = {**dup, **meta}
    assert np.abs(clado_matrix_se(pooled)).max() <= 1e-9 * np.abs(clado_matrix(pooled)).max()
    G_na, _ = method_objective("clado_na", pooled, ctx.table, {"k": "universal"})
    G_psd, _ = method_objective("clado", pooled, ctx.table)
    np.testing.assert_allclose(G_na, G_psd, rtol=1e-6, atol=1e-12)


def test_shrinkage_zeroes_pure_noise_and_keeps_signal():
    """Entries that are pure noise (mean 0) mostly become exactly 0 and all move toward 0; entries 6
    standard errors away stay, shrunk by 2 SE."""
    rng = np.random.default_rng(1)
    N, n = 64, 40
    noise = rng.normal(0.0, 1.0, size=(N, n, n))
    signal = np.zeros((n, n))
    signal[:4, :4] = 6.0 / np.sqrt(N)  # six standard errors
    g = noise + signal
    G, se = g.mean(0), mean_se(g.sum(0), (g**2).sum(0), N)
    shrunk = soft_threshold(G, se, 2.0)
    pure = signal == 0
    assert (shrunk[pure] == 0).mean() > 0.9  # P(|z| < 2) = 0.954
    assert np.all(np.abs(shrunk) <= np.abs(G)) and np.all(shrunk * G >= 0)
    assert np.all(shrunk[:4, :4] > 0)
    np.testing.assert_allclose(shrunk[:4, :4], G[:4, :4] - 2 * se[:4, :4])
    assert np.abs(shrunk[pure]).mean() < 0.1 * np.abs(G[pure]).mean()  # E|soft(z, 2)| ≈ 0.02 E|z|


def test_universal_threshold_zeroes_every_pure_noise_entry():
    """k = "universal": √(2 ln m) over the m measured interactions (upper triangle) and √(2 ln n) over
    the diagonal. With n = 120 options (m = 7,140) of pure noise not one interaction survives, where
    k = 2 keeps about 4.6 % of them; a real effect 8 SE away stays."""
    from mpqflow.methods import clado_na_thresholds, universal_threshold

    assert universal_threshold(7140) == pytest.approx(np.sqrt(2 * np.log(7140)))
    assert universal_threshold(1) == 0.0
    rng = np.random.default_rng(3)
    N, n = 64, 120
    g = rng.normal(0.0, 1.0, size=(N, n, n))
    g = (g + g.transpose(0, 2, 1)) / np.sqrt(2)  # symmetric per-sample entries, as CLADO's
    g[:, 0, 1] = g[:, 1, 0] = g[:, 0, 1] + 8.0 / np.sqrt(N)
    G, se = g.mean(0), mean_se(g.sum(0), (g**2).sum(0), N)
    k_off, k_diag = clado_na_thresholds(se, "universal")
    assert k_off == pytest.approx(np.sqrt(2 * np.log(n * (n - 1) // 2)))
    assert k_diag == pytest.approx(np.sqrt(2 * np.log(n)))
    na = noise_aware_matrix(G, se, "universal")
    off = ~np.eye(n, dtype=bool)
    off[0, 1] = off[1, 0] = False
    assert np.count_nonzero(na[off]) == 0
    assert np.count_nonzero(soft_threshold(G, se, 2.0)[off]) > 0.03 * off.sum()
    assert na[0, 1] > 0
    np.testing.assert_allclose(np.diag(na), np.diag(G) + k_diag * np.diag(se))
    assert clado_na_thresholds(se, 1.5) == (1.5, 1.5)
    for bad in ("fixed", -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="clado_na k"):
            clado_na_thresholds(se, bad)


def test_noise_aware_matrix_thresholds_interactions_and_bounds_effects():
    G = np.array([[0.2, -0.05, 0.005], [-0.05, -0.01, 0.0], [0.005, 0.0, 0.3]])
    se = np.full_like(G, 0.01)
    np.testing.assert_allclose(soft_threshold(G, se, 0.0), G)
    np.testing.assert_allclose(soft_threshold(G, se, 3.0), np.sign(G) * np.clip(np.abs(G) - 0.03, 0, None))
    na = noise_aware_matrix(G, se, 3.0)
    np.testing.assert_allclose(np.diag(na), np.diag(G) + 0.03)  # upper confidence bounds, never below G
    assert na[0, 1] == pytest.approx(-0.02) and na[0, 2] == 0 and na[1, 2] == 0  # 0.005 is noise
    np.testing.assert_allclose(noise_aware_matrix(G, np.zeros_like(G), 3.0), G)  # no noise: unchanged
    assert np.linalg.eigvalsh(psd_project(na)).min() >= -1e-12


def test_clado_na_prefers_precisely_small_effects_with_no_budget():
    """Two layers, options (w8, w2): w8's effect is tiny and precise, w2's is larger but within noise,
    with a noisy negative interaction. Thresholding everything would make w2 free (a tie at 0 or
    worse); clado_na keeps w8 at both layers."""
    G = np.array(
        [[1e-5, 0.0, 0.0, 0.0], [0.0, 0.01, -0.01, -0.015], [0.0, -0.01, 1e-5, 0.0], [0.0, -0.015, 0.0, 0.012]]
    )
    se = np.array([[1e-6, 0, 1e-6, 1e-6], [0, 0.01, 0.01, 0.01], [1e-6, 0.01, 1e-6, 1e-6], [1e-6, 0.01, 1e-6, 0.01]])
    obj = psd_project(noise_aware_matrix(G, se, 2.0))
    plans = {(a, b): np.eye(4)[a] + np.eye(4)[b] for a in (0, 1) for b in (2, 3)}
    best = min(plans, key=lambda p: plans[p] @ obj @ plans[p])
    assert best == (0, 2)
    naive = psd_project(soft_threshold(G, se, 2.0))  # the rejected variant: w2 at layer 0 is free
    assert plans[(1, 2)] @ naive @ plans[(1, 2)] <= plans[(0, 2)] @ naive @ plans[(0, 2)] + 1e-12


def test_clado_na_keeps_the_highest_option_unless_a_difference_is_significant():
    """Two layers, options (w8, w4): at layer 0, w4's effect is below w8's on this batch but by less
    than the noise of their paired difference; w8 must stay. The bound on the marginal SE (w4's SE
    smaller than w8's here) would pick w4; a w4 effect 10 paired SEs below w8's is taken."""
    G = np.diag([3e-4, 1e-4, 2e-4, 5e-3])
    se = np.diag([3e-4, 2e-4, 1e-4, 1e-3])
    paired = np.array([0.0, 3e-4, 0.0, 1e-3])  # SE of each option's difference to its layer's w8
    plans = {(a, b): np.eye(4)[a] + np.eye(4)[b] for a in (0, 1) for b in (2, 3)}

    def best(obj):
        return min(plans, key=lambda p: plans[p] @ obj @ plans[p])

    assert best(psd_project(noise_aware_matrix(G, se, 2.0, paired))) == (0, 2)
    assert best(psd_project(noise_aware_matrix(G, se, 2.0))) == (1, 2)  # marginal SEs: noise decides
    G[1, 1] = 3e-4 - 10 * 3e-4 / 10 - 3e-3  # 10 paired SEs below
    paired[1] = 3e-4
    assert best(psd_project(noise_aware_matrix(G, se, 2.0, paired))) == (1, 2)


def test_old_files_without_second_moments_are_refused(tiny, tmp_path):
    ctx, x, y = tiny
    path = tmp_path / "batch_0.npz"
    save_batch_file(path, compute_batch("mpqco", ctx, x[:4], y[:4]), batch_meta(ctx, "mpqco", {}))
    data = dict(np.load(path))
    data["format"] = np.int64(FORMAT_VERSION - 1)
    del data["sq_squared_sum"]
    save_npz(tmp_path / "old.npz", **data)
    with pytest.raises(ValueError, match=rf"old\.npz: sensitivity file format {FORMAT_VERSION - 1}.*recompute"):
        load_batch_file(tmp_path / "old.npz")
    with pytest.raises(ValueError, match="no 'sq_squared_sum'.*recompute"):
        mpqco_se({k: v for k, v in load_batch_file(path).items() if k != "sq_squared_sum"})
