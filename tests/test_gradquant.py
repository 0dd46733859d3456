"""Quantized gradient exchange (mpqflow/comm/): the codes, their packing, unbiasedness, and a real
2-process gloo DDP run with the communication hook."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from mpqflow.comm import (
    GradQuantState,
    decode,
    encode,
    initial_levels,
    pack_codes,
    packed_bytes,
    quantized_allgather_hook,
    unpack_codes,
)
from mpqflow.config import TrainSettings
from mpqflow.levels.fit import exponential_levels, uniform_levels
from mpqflow.train import fit, launch

HERE = Path(__file__).resolve().parent
TARGET = f"{Path(__file__).stem}:gradquant_job"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("numel", [1, 8, 13, 1000])
def test_packed_codes_round_trip_exactly(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(bits * numel))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(numel, bits) == -(-numel * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_pack_refuses_codes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\) to fit 3 bits"):
        pack_codes(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 9)


@pytest.mark.parametrize("levels", [uniform_levels(4), exponential_levels(4, 0.5)], ids=["qsgd", "nuqsgd"])
def test_quantization_is_unbiased_with_the_stated_variance(levels):
    """K draws of a fixed vector: each coordinate's mean is within 5 standard errors of the value,
    using the exact per-coordinate variance ||b||^2 (l_{j+1} - r)(r - l_j); the z-scores have mean
    square 1 within 0.15 (1000 coordinates)."""
    g = torch.Generator().manual_seed(0)
    v, bucket, K = torch.randn(1000, generator=g), 100, 4000
    total = torch.zeros(1000, dtype=torch.float64)
    for _ in range(K):
        codes, norms = encode(v, levels, bucket, g)
        q = decode(codes, norms, levels, bucket).double()
        total += q
        values = {round(float(x), 4) for x in (q / norms.double().repeat_interleave(bucket)).abs()}
        assert values <= {round(float(x), 4) for x in levels}  # every value is ||b|| * sign * a level
    b = v.double().view(-1, bucket)
    norm = b.norm(dim=1, keepdim=True)
    r = (b.abs() / norm).view(-1)
    lv = levels.double()
    j = torch.clamp(torch.searchsorted(lv, r, right=True) - 1, 0, lv.numel() - 2)
    var = (norm.repeat(1, bucket).view(-1) ** 2) * (lv[j + 1] - r) * (r - lv[j])
    z = (total / K - v.double()) / torch.sqrt(var / K).clamp_min(1e-12)
    z = z[var > 1e-12]
    assert z.abs().max() < 5, z.abs().max()
    assert abs(float((z**2).mean()) - 1) < 0.15, float((z**2).mean())


def test_initial_levels_and_unknown_method():
    assert torch.allclose(initial_levels("qsgd", 3), uniform_levels(4))
    assert torch.allclose(initial_levels("alq", 3), exponential_levels(4, 0.5))
    with pytest.raises(ValueError, match="unknown gradient quantizer 'topk'"):
        initial_levels("topk", 3)


# ---- a real 2-process DDP run with the hook ----


def _data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 1, 8, 8, generator=g)
    return TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long())


def gradquant_job(out: str, method: str, *, env, state_dir=None, stop_after=None):
    """The launch target: fit a small MLP with `grad_quant` in its settings (fit registers the hook);
    every rank writes its parameters to `out`.rank<r>. `stop_after`: every rank fails after that
    many epochs (as a killed job would, after its epoch checkpoint)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    grad_quant = {"method": method, "bits": 3, "bucket_size": 128, "norm": "l2", "update_iters": [3, 20]}
    settings = TrainSettings(epochs=6, batch_size=32, lr=0.1, momentum=0.9, weight_decay=0.0, augment_shift=0,
                             world_size=env.world_size, amp=False, grad_quant=grad_quant)  # fmt: skip

    def stop(epochs_done):
        if epochs_done == stop_after:
            raise RuntimeError(f"stopped after epoch {epochs_done}")

    fit(model, _data(), settings, seed=0, env=env, state_dir=state_dir, epoch_hook=stop)
    torch.save(model.state_dict(), f"{out}.rank{env.rank}")


_SUMMARY = re.compile(
    r"gradient exchange \((\w+), 3 bits: (\d+) steps, (\d+) bytes handed to collectives per process "
    r"\(([0-9.]+) of float32\), (\d+) bytes written to the wire, (\d+) level refits\)"
)


@pytest.fixture
def workers_see_tests(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["alq", "qsgd"])
def test_two_gloo_processes_exchange_packed_codes_and_agree(method, tmp_path, workers_see_tests):
    """Both ranks end with identical parameters, the loss falls, ALQ refits its levels at the
    configured steps, and each rank hands all_gather about 3/32 of the float32 bytes (3-bit codes
    plus one float32 norm per 128 coordinates). The bytes measured on the wire (what the process
    wrote to its sockets) are those bytes plus gloo's message headers: at least the payload, and at
    most 400 bytes more per collective call."""
    out = tmp_path / "m.pt"
    launch(TARGET, {"out": str(out), "method": method}, 2, threads=2, log_path=str(tmp_path / "log"), timeout_s=30)
    states = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    log = (tmp_path / "log").read_text()
    m = _SUMMARY.search(log)
    assert m and m.group(1) == method, log[-2000:]
    steps, sent, ratio, wire, refits = int(m.group(2)), int(m.group(3)), float(m.group(4)), int(m[5]), int(m[6])
    assert steps == 6 * 8  # 256 samples in global batches of 32, 6 epochs
    assert refits == (2 if method == "alq" else 0)
    assert 3 / 32 < ratio < 3 / 32 + 1.5 / 128, ratio
    calls = 2 * steps + refits  # codes and norms of the one DDP bucket per step, a broadcast per refit
    assert sent <= wire <= sent + 400 * calls + 8 * 8 * refits, (sent, wire)
    assert log.count("gradient exchange") == 1  # rank 0 alone reports
    losses = [float(x) for x in re.findall(r"epoch \d+/6 loss ([0-9.]+)", log)]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_interrupted_run_with_alq_exchange_resumes_bit_for_bit(tmp_path, workers_see_tests):
    """The exchange's state (levels, rounding generators, counters) is checkpointed with each epoch:
    a run stopped after epoch 2 (before ALQ's second refit at step 20) resumes to exactly the
    parameters, levels and byte counts of the uninterrupted run."""

    def run(name, **kw):
        launch(TARGET, {"out": str(tmp_path / name), "method": "alq", **kw}, 2, threads=2,
               log_path=str(tmp_path / f"{name}.log"), timeout_s=30)  # fmt: skip
        return torch.load(tmp_path / f"{name}.rank0", weights_only=True), (tmp_path / f"{name}.log").read_text()

    reference, ref_log = run("ref")
    state_dir = str(tmp_path / "state")
    with pytest.raises(Exception, match="rank"):
        run("cut", state_dir=state_dir, stop_after=2)
    resumed, log = run("cut", state_dir=state_dir)
    assert "resumed from" in log and "2 of 6 epochs done" in log
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert _SUMMARY.search(log).group(2, 3, 6) == _SUMMARY.search(ref_log).group(2, 3, 6)


def test_hook_in_one_process_averages_nothing_and_counts_steps():
    """world_size 1: fit runs without DDP, so the hook is exercised directly on a fake bucket."""

    class Bucket:
        def __init__(self, t, last):
            self.t, self.last = t, last

        def buffer(self):
            return self.t

        def is_last(self):
            return self.last

    state = GradQuantState(method="amq", bits=3, bucket_size=64, norm="l2", update_iters=(1,), seed=0, rank=0,
                           world_size=1)  # fmt: skip
    g = torch.randn(300, generator=torch.Generator().manual_seed(2))
    first = quantized_allgather_hook(state, Bucket(g, False)).value()
    assert first.shape == g.shape and state.step == 0
    quantized_allgather_hook(state, Bucket(g, True)).wait()
    assert state.step == 1 and state.updates == 1  # refitted at the end of step 1
    assert not np.allclose(state.levels.numpy(), initial_levels("amq", 3).numpy())
    assert state.bytes_sent == 2 * (packed_bytes(300, 3) + 5 * 4)
    assert state.wire_bytes is None  # no process group: nothing crossed a wire
    # the recorded variance is the exact E||Q(g) - g||^2 / ||g||^2 of the step (both buckets alike)
    ((step, nvar),) = state.variance
    lv = initial_levels("amq", 3).double()
    b = torch.nn.functional.pad(g.double(), (0, 20)).view(-1, 64)
    r = b.abs() / b.norm(dim=1, keepdim=True)
    j = torch.clamp(torch.searchsorted(lv, r.contiguous(), right=True) - 1, 0, lv.numel() - 2)
    want = float((b.norm(dim=1, keepdim=True) ** 2 * (lv[j + 1] - r) * (r - lv[j])).sum() / g.double().square().sum())
    assert step == 1 and nvar == pytest.approx(want, rel=1e-12)
    # the state round-trips through its state_dict (what the epoch checkpoint keeps)
    copy = GradQuantState(method="amq", bits=3, bucket_size=64, norm="l2", update_iters=(1,), seed=9, rank=0,
                          world_size=1)  # fmt: skip
    copy.load_state_dict(state.state_dict())
    assert torch.equal(copy.levels, state.levels) and copy.variance == state.variance
    assert torch.equal(encode(g, copy.levels, 64, copy.generator)[0], encode(g, state.levels, 64, state.generator)[0])


def test_grad_quant_config_defaults_and_checks():
    import copy

    from mpqflow.config import ConfigError, validate_config

    raw = {"models": {"m": {"arch": "digits_cnn", "dataset": {"name": "digits"},
                            "train": {"world_size": 2, "grad_quant": {"method": "alq"}}}}}  # fmt: skip
    cfg = validate_config(raw)
    assert cfg["models"]["m"]["train"]["grad_quant"] == {
        "bits": 3, "bucket_size": 8192, "method": "alq", "norm": "l2", "update_iters": [100, 2000]
    }  # fmt: skip
    assert cfg["finetune"]["grad_quant"] is None and cfg["limpq"]["grad_quant"] is None
    one = copy.deepcopy(raw)
    one["models"]["m"]["train"]["world_size"] = 1
    with pytest.raises(ConfigError, match=r"'models.m.train.grad_quant': quantized gradient exchange needs"):
        validate_config(one)
    bad = copy.deepcopy(raw)
    bad["models"]["m"]["train"]["grad_quant"] = {"method": "topk"}
    with pytest.raises(ConfigError, match="grad_quant"):
        validate_config(bad)
    bad["models"]["m"]["train"]["grad_quant"] = {"method": "qsgd", "bits": 1}
    with pytest.raises(ConfigError, match="grad_quant"):
        validate_config(bad)
