"""Tests of mpqflow.quant.quantizer.ModelQuantizer on a small conv model with a residual connection."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpqflow.quant import ModelQuantizer, QuantScheme, fake_quantize

LAYERS = ["stem", "block.conv1", "block.conv2", "fc"]


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.bn(self.conv1(x)))))  # residual


class Net(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = Block(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):  # (B, 3, H, W)
        x = self.block(F.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def _setup(weight=None, act=None, w_bits=(2, 4, 8), a_bits=(4, 8), seed=0):
    torch.manual_seed(seed)
    model = Net()
    model.block.bn.running_mean.normal_(0, 0.1)
    q = ModelQuantizer(
        model,
        LAYERS,
        weight or QuantScheme.of(granularity="per_channel"),
        act or QuantScheme.of(observer="ema_minmax", symmetric=False),
        list(w_bits),
        list(a_bits),
    )
    return model, q


def _batches(n=4, bs=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, 6, 6, generator=g) for _ in range(n)]


@pytest.fixture()
def calibrated():
    model, q = _setup()
    q.calibrate(_batches())
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    return model, q, x


def _fp_state(model):
    return {n: (p.data.clone(), p.data.data_ptr()) for n, p in model.named_parameters()}


def test_constructor_errors():
    model = Net()
    with pytest.raises(ValueError, match="'block.conv3' is not a module"):
        ModelQuantizer(model, ["stem", "block.conv3"], QuantScheme.of(), QuantScheme.of(), [4], [8])
    with pytest.raises(ValueError, match="'block.bn' is a BatchNorm2d"):
        ModelQuantizer(model, ["block.bn"], QuantScheme.of(), QuantScheme.of(), [4], [8])
    with pytest.raises(ValueError, match="w_bits"):
        ModelQuantizer(model, ["stem"], QuantScheme.of(), QuantScheme.of(), [0], [8])
    with pytest.raises(ValueError, match="1-bit"):
        ModelQuantizer(model, ["stem"], QuantScheme.of(), QuantScheme.of(), [1, 2], [8])
    with pytest.raises(ValueError, match="more than once"):
        ModelQuantizer(model, ["stem", "stem"], QuantScheme.of(), QuantScheme.of(), [4], [8])


def test_uncalibrated_use_raises():
    model, q = _setup()
    for call in (
        lambda: q.apply({"fc": (4, 4)}),
        lambda: q.quantized_weight("fc", 4),
        lambda: q.quantize_input("fc", torch.randn(2, 8), 4),
        lambda: q.weight_qparams("fc", 4),
        lambda: q.state_dict(),
    ):
        with pytest.raises(RuntimeError, match=r"calibrate\(\) or load_state_dict\(\) first"):
            call()
    q.remove()  # harmless


def test_apply_remove_restores_exactly(calibrated):
    model, q, x = calibrated
    model.eval()
    before = _fp_state(model)
    with torch.no_grad():
        y0 = model(x)
        q.apply({l: (2, 4) for l in LAYERS})
        yq = model(x)
        assert not torch.allclose(yq, y0)
        assert q.assignment == {l: (2, 4) for l in LAYERS}
        q.remove()
        assert torch.equal(model(x), y0)
    assert q.assignment == {}
    for n, p in model.named_parameters():
        assert torch.equal(p.data, before[n][0]) and p.data.data_ptr() == before[n][1], n
    for layer in LAYERS:
        m = model.get_submodule(layer)
        assert len(m._forward_pre_hooks) == 0


def test_second_assignment_replaces_first(calibrated):
    model, q, x = calibrated
    model.eval()
    a = {"stem": (2, 4), "block.conv1": (4, 8), "fc": (8, 8)}
    b = {"block.conv1": (2, None), "block.conv2": (None, 4)}
    with torch.no_grad():
        with q.applied(b):
            y_b = model(x)
        q.apply(a)
        q.apply(b)
        assert torch.equal(model(x), y_b)
        assert q.assignment == b
        # layers not named in b are back in FP
        assert torch.equal(model.stem.weight.data, q._fp_weight("stem")) and "stem" not in q._saved_weight
        assert len(model.fc._forward_pre_hooks) == 0 and len(model.stem._forward_pre_hooks) == 0
        assert len(model.block.conv2._forward_pre_hooks) == 1
        q.remove()


def test_only_named_layers_change(calibrated):
    model, q, x = calibrated
    before = _fp_state(model)
    q.apply({"block.conv2": (4, None)})
    for n, p in model.named_parameters():
        if n == "block.conv2.weight":
            assert not torch.equal(p.data, before[n][0])
            assert torch.equal(p.data, q.quantized_weight("block.conv2", 4))
        else:
            assert torch.equal(p.data, before[n][0]) and p.data.data_ptr() == before[n][1], n
    assert all(len(model.get_submodule(l)._forward_pre_hooks) == 0 for l in LAYERS)
    q.remove()


def test_apply_touches_only_changed_layers(calibrated):
    model, q, x = calibrated
    q.apply({"stem": (8, 8), "fc": (8, 8), "block.conv1": (2, 4)})
    stem_hook, stem_ptr = q._hooks["stem"], model.stem.weight.data_ptr()
    calls = []
    orig_w, orig_a = q._set_weight, q._set_act
    q._set_weight = lambda l, b: (calls.append(("w", l)), orig_w(l, b))
    q._set_act = lambda l, b: (calls.append(("a", l)), orig_a(l, b))
    q.apply({"stem": (8, 8), "fc": (8, 8), "block.conv2": (2, 4)})
    assert sorted(calls) == [("a", "block.conv1"), ("a", "block.conv2"), ("w", "block.conv1"), ("w", "block.conv2")]
    assert q._hooks["stem"] is stem_hook and model.stem.weight.data_ptr() == stem_ptr
    q.remove()


def test_weight_and_input_quantization_semantics(calibrated):
    model, q, x = calibrated
    model.eval()
    w = model.block.conv1.weight.data.clone()
    qp = q.weight_qparams("block.conv1", 4)
    assert qp.ch_axis == 0 and qp.scale.shape == (8,)
    assert torch.equal(q.quantized_weight("block.conv1", 4), fake_quantize(w, *qp))
    assert q.quantized_weight("block.conv1", 4) is q.quantized_weight("block.conv1", 4)  # cached
    for c in range(8):
        assert torch.unique(q.quantized_weight("block.conv1", 2)[c]).numel() <= 4
    # input quantization: the layer sees quantize_input(x) of its FP input
    seen = {}
    h = model.fc.register_forward_pre_hook(lambda m, args: seen.__setitem__("fp", args[0]))
    with torch.no_grad():
        model(x)
        h.remove()
        with q.applied({"fc": (None, 4)}):
            y = model(x)
    ref = F.linear(q.quantize_input("fc", seen["fp"], 4), model.fc.weight, model.fc.bias)
    assert torch.allclose(y, ref, atol=1e-6)
    aq = q.act_qparams("fc", 4)
    assert aq.ch_axis is None and (aq.quant_min, aq.quant_max) == (0, 15)  # post-ReLU mean: unsigned
    assert torch.unique(q.quantize_input("fc", seen["fp"], 4)).numel() <= 16


def test_signed_inputs_and_symmetric_act():
    model, q = _setup(act=QuantScheme.of(observer="minmax", symmetric=True))
    q.calibrate(_batches())
    assert q.act_qparams("stem", 8)[2:4] == (-127, 127)  # raw images: signed (restricted range)
    assert q.act_qparams("block.conv2", 8)[2:4] == (0, 255)  # after ReLU: unsigned
    assert q.act_qparams("block.conv1", 8).zero_point.item() == 0


def test_per_channel_activations():
    model, q = _setup(act=QuantScheme.of(observer="ema_mse", granularity="per_channel", mse_grid=10))
    q.calibrate(_batches(2))
    qp = q.act_qparams("block.conv1", 4)
    assert qp.ch_axis == 1 and qp.scale.shape == (8,)
    assert q.act_qparams("fc", 4).scale.shape == (8,)
    with torch.no_grad(), q.applied({l: (4, 4) for l in LAYERS}):
        assert model(torch.randn(2, 3, 6, 6)).shape == (2, 5)


def test_applied_restores_on_exception_and_nesting(calibrated):
    model, q, x = calibrated
    model.eval()
    with torch.no_grad():
        y0 = model(x)
        with pytest.raises(KeyError):
            with q.applied({"stem": (2, 4)}):
                raise KeyError("boom")
        assert q.assignment == {} and torch.equal(model(x), y0)
        with q.applied({"stem": (2, 4)}):
            y1 = model(x)
            with q.applied({"fc": (2, 4)}):
                assert q.assignment == {"fc": (2, 4)}
            assert q.assignment == {"stem": (2, 4)} and torch.equal(model(x), y1)
        assert torch.equal(model(x), y0)


def test_bad_assignments_leave_state_untouched(calibrated):
    model, q, x = calibrated
    q.apply({"stem": (4, 8)})
    with pytest.raises(ValueError, match="weight bits 3 were not calibrated"):
        q.apply({"fc": (3, 8)})
    with pytest.raises(ValueError, match="'head'"):
        q.apply({"head": (4, 8)})
    with pytest.raises(ValueError, match=r"\(w_bits, a_bits\)"):
        q.apply({"fc": 4})
    assert q.assignment == {"stem": (4, 8)}
    q.apply({"stem": (None, None)})  # all-FP option is the same as leaving the layer out
    assert q.assignment == {}


def test_state_dict_round_trip_gives_identical_outputs(calibrated, tmp_path):
    model, q, x = calibrated
    model.eval()
    path = tmp_path / "calibration.pt"
    torch.save(q.state_dict(), path)
    model2 = copy.deepcopy(model)
    q2 = ModelQuantizer(model2, LAYERS, q.weight_scheme, q.act_scheme, q.w_bits, q.a_bits)
    q2.load_state_dict(torch.load(path, weights_only=True))
    assignment = {"stem": (8, 8), "block.conv1": (2, 4), "block.conv2": (4, None), "fc": (None, 8)}
    with torch.no_grad(), q.applied(assignment), q2.applied(assignment):
        assert torch.equal(model(x), model2(x))
    state = q.state_dict()
    assert state["qparams"]["fc"]["act"][4]["min_val"] is not None
    assert set(state) >= {"layers", "weight_scheme", "act_scheme", "w_bits", "a_bits", "qparams"}


def test_load_state_dict_mismatches_raise(calibrated):
    model, q, x = calibrated
    state = q.state_dict()
    other = ModelQuantizer(model, LAYERS, q.weight_scheme, q.act_scheme, [2, 4], q.a_bits)
    with pytest.raises(ValueError, match=r"w_bits differ: state has \[2, 4, 8\], this quantizer has \[2, 4\]"):
        other.load_state_dict(state)
    other = ModelQuantizer(model, LAYERS, q.weight_scheme, q.act_scheme, q.w_bits, [8])
    with pytest.raises(ValueError, match="a_bits differ"):
        other.load_state_dict(state)
    other = ModelQuantizer(
        model, LAYERS, QuantScheme.of(observer="mse", granularity="per_channel"), q.act_scheme, q.w_bits, q.a_bits
    )
    with pytest.raises(ValueError, match="weight_scheme differs.*observer: 'minmax' vs 'mse'"):
        other.load_state_dict(state)
    other = ModelQuantizer(model, LAYERS[:3], q.weight_scheme, q.act_scheme, q.w_bits, q.a_bits)
    with pytest.raises(ValueError, match=r"layers differ: missing from state \[\], not in this quantizer \['fc'\]"):
        other.load_state_dict(state)


def test_calibrate_max_samples_and_mode(calibrated):
    model, q, x = calibrated
    batches = _batches(4, bs=8)
    model.train()
    q.apply({"fc": (2, 4)})
    q.calibrate(iter(batches), max_samples=12)  # 8 + 4 samples
    assert model.training and q.assignment == {}
    model2, q2 = _setup()
    q2.calibrate([batches[0], batches[1][:4]])
    for l in LAYERS:
        for b in (4, 8):
            assert torch.equal(q.act_qparams(l, b).scale, q2.act_qparams(l, b).scale)
    with pytest.raises(RuntimeError, match="no samples"):
        q2.calibrate([])


def test_input_hook_passes_gradients(calibrated):
    model, q, x = calibrated
    xg = x.clone().requires_grad_(True)
    with q.applied({l: (4, 8) for l in LAYERS}):
        model(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(calibrated):
    model, q, x = calibrated
    model.eval()
    state = q.state_dict()
    with torch.no_grad(), q.applied({l: (4, 8) for l in LAYERS}):
        y_cpu = model(x)
    model.cuda()
    q2 = ModelQuantizer(model, LAYERS, q.weight_scheme, q.act_scheme, q.w_bits, q.a_bits)
    q2.load_state_dict(state)
    with torch.no_grad():
        y0 = model(x.cuda())
        with q2.applied({l: (4, 8) for l in LAYERS}):
            y = model(x.cuda())
        assert torch.equal(model(x.cuda()), y0)
    assert q2.weight_qparams("fc", 4).scale.is_cuda
    assert torch.allclose(y.cpu(), y_cpu, atol=1e-4)
    q2.calibrate([b.cuda() for b in _batches()])
    with torch.no_grad(), q2.applied({l: (2, 4) for l in LAYERS}):
        assert model(x.cuda()).is_cuda


def test_layer_that_never_runs_is_reported():
    model = Net()
    model.unused = nn.Linear(8, 8)
    q = ModelQuantizer(model, LAYERS + ["unused"], QuantScheme.of(), QuantScheme.of(), [4], [8])
    with pytest.raises(RuntimeError, match=r"never ran.*\['unused'\]"):
        q.calibrate(_batches(1))


def test_public_import_paths():
    """The split of quantizer.py keeps the old import paths (same objects)."""
    from mpqflow.quant import qparams
    from mpqflow.quant.quantizer import ChannelBits, QParams, quantize_weight

    assert (QParams, ChannelBits, quantize_weight) == (qparams.QParams, qparams.ChannelBits, qparams.quantize_weight)
