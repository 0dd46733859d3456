"""entropy_bits measures the bit-rate of quantized tensors: exact values on small cases, agreement
with a per-channel numpy reference (per-channel grids, non-uniform levels, ties, constant channels),
and a cost that grows with the tensor, not with channels x all its distinct values."""

import math

import numpy as np
import pytest
import torch

from mpqflow.quant.entropy import entropy_bits, mean_entropy_bits


def _reference(q: torch.Tensor, ch_axis) -> float:
    """The definition, one channel at a time: mean over channels of -sum p log2 p of its values."""
    a = q.numpy()
    rows = a.reshape(1, -1) if ch_axis is None else np.moveaxis(a, ch_axis, 0).reshape(a.shape[ch_axis], -1)
    hs = []
    for row in rows:
        _, counts = np.unique(row, return_counts=True)
        p = counts / counts.sum()
        hs.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(hs))


def _per_channel_quantized(shape, ch_axis, g, bits=4):
    """Fake-quantized values on a different grid per channel (own scale and zero point), with one
    constant channel and one channel on non-uniform levels (a few values, many ties)."""
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.movedim(ch_axis, 0)  # (C, ...) view
    C = x.shape[0]
    scale = torch.rand(C, generator=g, dtype=torch.float64) * 0.5 + 0.01
    zp = torch.randint(0, 2**bits, (C,), generator=g).double()
    view = (C,) + (1,) * (x.dim() - 1)
    codes = torch.clamp(torch.round(x / scale.view(view)) + zp.view(view), 0, 2**bits - 1)
    q = (codes - zp.view(view)) * scale.view(view)
    q[0] = 0.37  # constant channel
    levels = torch.tensor([-1.3, -0.2, 0.05, 0.9, 2.7], dtype=torch.float64)  # non-uniform (ALQ-like)
    q[C - 1] = levels[torch.randint(0, 5, q[C - 1].shape, generator=g)]
    return q.movedim(0, ch_axis).float().contiguous()


def test_entropy_bits():
    assert entropy_bits(torch.zeros(100, dtype=torch.int32)) == 0.0
    assert entropy_bits(torch.arange(16).repeat(10)) == pytest.approx(4.0)
    q = torch.tensor([0] * 50 + [1] * 25 + [2] * 25)
    assert entropy_bits(q) == pytest.approx(1.5)
    # per channel: two channels each uniform over 2 of their own values -> 1 bit, whole tensor -> 2 bits
    q2 = torch.tensor([[0, 1] * 8, [2, 3] * 8])
    assert entropy_bits(q2, ch_axis=0) == pytest.approx(1.0)
    assert entropy_bits(q2) == pytest.approx(2.0)
    assert entropy_bits(q2.T, ch_axis=1) == pytest.approx(1.0)
    assert mean_entropy_bits([torch.zeros(30), torch.arange(4).repeat(10)]) == pytest.approx(40 * 2 / 70)
    assert entropy_bits(torch.zeros(0, 5), ch_axis=0) == 0.0 and mean_entropy_bits([]) == 0.0
    assert entropy_bits(torch.tensor([[float("inf"), 0.0, 0.0, 1.0]]), ch_axis=0) == pytest.approx(1.5)
    # a 4-bit quantized Gaussian needs fewer than 4 bits per element
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    codes = torch.clamp(torch.round(x / (2 * x.abs().max() / 15)) + 8, 0, 15)
    assert 1.0 < entropy_bits(codes) < 4.0 - 0.5
    assert math.isfinite(entropy_bits(codes.float(), ch_axis=0))


@pytest.mark.parametrize("ch_axis", [0, 1, None])
@pytest.mark.parametrize("shape", [(6, 50), (5, 7, 3, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_bits_matches_per_channel_reference(shape, ch_axis, seed):
    g = torch.Generator().manual_seed(seed)
    q = _per_channel_quantized(shape, 0 if ch_axis is None else ch_axis, g)
    assert entropy_bits(q, ch_axis) == pytest.approx(_reference(q, ch_axis), rel=1e-12, abs=1e-12)
    # integer codes, a non-contiguous view and a negative axis give the same answer
    if ch_axis is not None:
        qt = q.transpose(0, 1)
        axis = 1 - ch_axis
        assert entropy_bits(qt, axis) == pytest.approx(_reference(qt.contiguous(), axis), rel=1e-12, abs=1e-12)
        assert entropy_bits(q, ch_axis - q.dim()) == entropy_bits(q, ch_axis)
    ints = torch.randint(-3, 4, shape, generator=g)
    assert entropy_bits(ints, ch_axis) == pytest.approx(_reference(ints, ch_axis), rel=1e-12, abs=1e-12)


def test_mean_entropy_bits_is_element_weighted_per_channel_reference():
    g = torch.Generator().manual_seed(2)
    ts = [_per_channel_quantized((4, 30), 0, g), _per_channel_quantized((8, 3, 3, 3), 0, g)]
    expected = sum(_reference(t, 0) * t.numel() for t in ts) / sum(t.numel() for t in ts)
    assert mean_entropy_bits(ts, ch_axis=0) == pytest.approx(expected, rel=1e-12)


def test_entropy_bits_count_table_is_bounded_by_numel(monkeypatch):
    """1000 channels x 512 values, each channel on its own 8-bit grid: ~256k distinct values in the
    tensor. The count tables must be channels x (codes of ONE channel), not x 256k, on both the
    grid path and the sorting fallback (non-uniform levels)."""
    import mpqflow.quant.entropy as entropy

    g = torch.Generator().manual_seed(3)
    scale = torch.rand(1000, 1, generator=g) + 0.5
    uniform = torch.randint(-128, 128, (1000, 512), generator=g).float() * scale
    levels = torch.randn(1000, 256, generator=g)  # non-uniform levels per channel
    nonuniform = levels.gather(1, torch.randint(0, 256, (1000, 512), generator=g))
    real = entropy._count_codes
    for q in (uniform, nonuniform):
        sizes = []

        def bounded(codes, n, q=q, sizes=sizes):
            assert codes.shape[0] * n <= q.numel(), f"count table of {codes.shape[0] * n} for {q.numel()} values"
            sizes.append(codes.shape[0] * n)
            return real(codes, n)

        monkeypatch.setattr(entropy, "_count_codes", bounded)
        assert entropy_bits(q, ch_axis=0) == pytest.approx(_reference(q, 0), rel=1e-12)
        assert sizes


def test_entropy_bits_mixed_channels_in_small_blocks(monkeypatch):
    """Blocks of a few channels, each mixing the grid path and the sorting fallback: a per-channel
    grid, a constant channel, non-uniform levels, a grid finer than its sample shows, +-inf."""
    import mpqflow.quant.entropy as entropy

    g = torch.Generator().manual_seed(4)
    rows = [
        torch.randint(0, 16, (300,), generator=g).float() * 0.37 - 1.1,
        torch.full((300,), -2.5),
        torch.tensor([-1.3, -0.2, 0.05, 0.9, 2.7])[torch.randint(0, 5, (300,), generator=g)],
        torch.where(torch.arange(300) == 7, 1e-6, torch.randint(0, 2, (300,), generator=g).float()),
        torch.tensor([-float("inf"), 0.0, 1.0, float("inf")])[torch.randint(0, 4, (300,), generator=g)],
        torch.randint(-3, 3, (300,), generator=g).float() * 1e-3 + 1000.0,
    ]
    q = torch.stack(rows * 3)  # (18, 300)
    monkeypatch.setattr(entropy, "_BLOCK", 4 * 300)
    for axis, t in ((0, q), (1, q.T)):
        assert entropy_bits(t, axis) == pytest.approx(_reference(t.contiguous(), axis), rel=1e-12, abs=1e-12)


def test_fake_quantized_channels_take_the_grid_path():
    """Per-channel fake-quantized weights are counted without the sorting fallback."""
    from mpqflow.quant import choose_qparams, fake_quantize
    from mpqflow.quant.entropy import _grid_counts

    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 3, 64)[:, None]
    for bits in (2, 4, 8):
        qp = choose_qparams(w.amin(1), w.amax(1), bits, symmetric=True, signed=True)
        q = fake_quantize(w, *qp, ch_axis=0)
        counts, ok = _grid_counts(q)
        assert bool(ok.all()) and counts.sum() == q.numel()
        assert entropy_bits(q, 0) == pytest.approx(_reference(q, 0), rel=1e-12)
