"""Tests of mpqflow.quant.export: integer export of an LSQ fine-tuned model and its reload into a fresh model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpqflow.quant import (
    EXPORT_FORMAT,
    ModelQuantizer,
    QuantScheme,
    export_integer,
    init_activations,
    load_export,
    lsq_assignment,
    lsq_range,
    prepare_lsq,
    read_export,
    save_export,
)

ASSIGNMENT = {"stem": (3, 8), "conv": (2, None), "fc": (None, 4)}  # stem input signed; an FP part in each


class Net(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.head = nn.Linear(c, c)  # never quantized: exported as float
        self.fc = nn.Linear(c, 5)

    def forward(self, x):  # (B, 3, H, W)
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.conv(x)).mean((2, 3))
        return self.fc(F.relu(self.head(x)))  # (B, 5)


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)


@pytest.fixture(scope="module")
def tuned():
    """An LSQ model calibrated from a ModelQuantizer, then fine-tuned a few SGD steps (steps move off the
    calibrated values), and the FP model it came from."""
    torch.manual_seed(0)
    net = Net().eval()
    q = ModelQuantizer(
        net,
        ["stem", "conv", "fc"],
        QuantScheme.of(granularity="per_channel"),
        QuantScheme.of(observer="ema_minmax", symmetric=False),
        [2, 3],
        [4, 8],
    )
    q.calibrate([_data(1)[0]])
    qnet = prepare_lsq(copy.deepcopy(net), ASSIGNMENT, quantizer=q)
    opt = torch.optim.SGD(qnet.parameters(), lr=0.05)
    x, y = _data(2)
    qnet.train()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(qnet(x), y).backward()
        opt.step()
    return qnet.eval(), net


def test_export_codes_scales_and_meta(tuned):
    qnet, _ = tuned
    state, meta = export_integer(qnet)
    assert state["format"] == meta["format"] == EXPORT_FORMAT and state["meta"] == meta
    assert json.loads(json.dumps(meta)) == meta  # JSON-able as is
    t = state["tensors"]
    for name, (w_bits, a_bits) in ASSIGNMENT.items():
        m, e = qnet.get_submodule(name), meta["layers"][name]
        assert (e["w_bits"], e["a_bits"]) == (w_bits, a_bits) and e["shape"] == list(m.weight.shape)
        if w_bits is None:
            assert e["weight_scale"] is None and t[f"{name}.weight"].dtype == torch.float32
            continue
        codes, scale = t[f"{name}.weight_int"], t[f"{name}.weight_scale"]
        qn, qp = lsq_range(w_bits, True)
        assert codes.dtype == torch.int8 and int(codes.min()) >= qn and int(codes.max()) <= qp
        assert e["w_signed"] is True and e["weight_scale"] == scale.tolist() and scale.shape == (m.weight.shape[0],)
        # dequantized integer weights are the fine-tuned fake-quant weights, bit for bit
        fq = m.weight_quant(m.weight).detach()
        assert torch.equal(codes.float() * scale.view(-1, *[1] * (codes.dim() - 1)), fq)
        assert f"{name}.weight" not in t and not any(k.startswith(f"{name}.weight_quant") for k in t)
    assert meta["layers"]["stem"]["a_signed"] is True and meta["layers"]["fc"]["a_signed"] is False
    assert meta["layers"]["stem"]["act_scale"] == pytest.approx(float(qnet.stem.act_quant.step.detach()))
    assert meta["layers"]["conv"]["act_scale"] is None and "conv.act_scale" not in t
    assert {"head.weight", "head.bias", "bn.running_mean", "stem.bias", "fc.bias"} <= set(t)
    assert "head" not in meta["layers"] and "conv.bias" not in t


def test_load_export_reproduces_logits(tuned, tmp_path):
    qnet, _ = tuned
    x = _data(3)[0]
    meta = save_export(tmp_path / "q.pt", tmp_path / "q.json", qnet)
    on_disk = json.loads((tmp_path / "q.json").read_text())
    assert on_disk == meta
    fresh = load_export(Net().eval(), read_export(tmp_path / "q.pt"), on_disk)
    assert lsq_assignment(fresh) == ASSIGNMENT
    assert torch.equal(fresh(x), qnet(x))  # same codes, same steps, same float ops
    for name in ("stem", "conv"):
        a, b = fresh.get_submodule(name), qnet.get_submodule(name)
        assert torch.equal(a.weight_quant(a.weight), b.weight_quant(b.weight).detach())


def test_load_export_per_tensor_weights_and_lsq_init():
    torch.manual_seed(4)
    qnet = prepare_lsq(Net().eval(), {"conv": (4, 4), "fc": (8, 2)}, weight_init="limpq", per_channel=False)
    init_activations(qnet, [_data(5)[0]])
    state, meta = export_integer(qnet)
    assert meta["layers"]["conv"]["w_per_channel"] is False and len(meta["layers"]["conv"]["weight_scale"]) == 1
    x = _data(6)[0]
    assert torch.equal(load_export(Net().eval(), state)(x), qnet(x))


def test_export_and_load_refusals(tuned):
    qnet, _ = tuned
    with pytest.raises(ValueError, match="no LSQ layers"):
        export_integer(Net())
    half = prepare_lsq(Net(), {"fc": (2, 4)}, weight_init="lsq")
    with pytest.raises(ValueError, match="layer 'fc': a quantizer is not initialized"):
        export_integer(half)
    state, meta = export_integer(qnet)
    with pytest.raises(ValueError, match="fresh FP model"):
        load_export(copy.deepcopy(qnet), state)
    with pytest.raises(ValueError, match="meta does not match"):
        load_export(Net(), state, {**meta, "layers": {}})
    with pytest.raises(ValueError, match="format"):
        load_export(Net(), {"tensors": state["tensors"]})
    broken = {**state, "tensors": {k: v for k, v in state["tensors"].items() if k != "head.bias"}}
    with pytest.raises(ValueError, match="no entry 'head.bias'"):
        load_export(Net(), broken)
    extra = {**state, "tensors": {**state["tensors"], "extra.weight": torch.zeros(1)}}
    with pytest.raises(ValueError, match="entries the model does not"):
        load_export(Net(), extra)
    codes = state["tensors"]["conv.weight_int"].clone()
    codes[0, 0, 0, 0] = 5  # outside the 2-bit range [-2, 1]
    bad = {**state, "tensors": {**state["tensors"], "conv.weight_int": codes}}
    with pytest.raises(ValueError, match="layer 'conv': weight codes"):
        load_export(Net(), bad)
