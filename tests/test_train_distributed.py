"""The data-parallel trainer (mpqflow/train/): real 2-process gloo runs started by torchrun through
`launch`, against 1-process runs of the same global batches.

The model has no BatchNorm (its statistics are per rank in DDP, so only a BN-free model gives the
same parameters on 1 and 2 processes). 101 samples in global batches of 16: the last batch (5) splits
3 + 2, which checks the per-rank loss weighting. The slow tests start torchrun (5-10 s each; the
file takes about 75 s on 2 cores).

    python -m pytest tests/test_train_distributed.py            # -m "not slow": in-process tests only
"""

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from torch.utils.data import TensorDataset

import mpqflow.validation
from mpqflow.artifacts import load_checkpoint
from mpqflow.config import Config, ConfigError, Runtime, TrainSettings, validate_config
from mpqflow.stages.train import train_or_load
from mpqflow.train import DistEnv, LaunchError, cross_entropy_loss, fit, launch, loop
from mpqflow.train.loop import shard_bounds, steps_per_epoch
from mpqflow.train.state import STATE_FILE

HERE = Path(__file__).resolve().parent
TARGET = f"{Path(__file__).stem}:train_job"  # the workers import this module (tests/ on PYTHONPATH)
EPOCHS, BATCH, SAMPLES = 3, 16, 101
STEPS = steps_per_epoch(SAMPLES, BATCH, 2)  # 7 per epoch: 6 full batches and the last 5 samples
TIMEOUT_S = 8.0  # the process-group timeout of the launched runs
LAUNCH_LIMIT_S = 120  # a failing launch must be over well within this


def _settings(world_size: int, lr: float = 0.05) -> TrainSettings:
    return TrainSettings(
        epochs=EPOCHS, batch_size=BATCH, lr=lr, momentum=0.9, weight_decay=5e-4, augment_shift=1,
        world_size=world_size, amp=False, grad_quant=None,
    )  # fmt: skip


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randn(SAMPLES, 1, 8, 8, generator=g), torch.randint(0, 10, (SAMPLES,), generator=g))


def _model(dropout: bool = False) -> nn.Module:
    """A BN-free conv net; with dropout, ranks draw different masks (each resumes its own RNG)."""
    torch.manual_seed(7)
    drop = [nn.Dropout(0.2)] if dropout else []
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), *drop, nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def train_job(
    out: str, world_size: int, lr: float, state_dir=None, die_at=None, hang_at=None, dropout=False, *, env: DistEnv
):
    """The launch target: fit the tiny model; rank 0 saves its state_dict to `out`.

    Rank 1 exits at its `die_at`-th step (os._exit, as a killed process) or sleeps at its `hang_at`-th."""
    log = logging.getLogger("mpqflow")
    log.info("hello from rank %d", env.rank)
    if env.rank == 1:
        log.warning("rank 1 warns")
    calls = 0

    def loss_fn(model, x, y):
        nonlocal calls
        calls += 1
        if env.rank == 1 and calls == die_at:
            os._exit(17)
        if env.rank == 1 and calls == hang_at:
            time.sleep(600)
        return cross_entropy_loss(model, x, y)

    settings = _settings(world_size, lr)
    model = fit(_model(dropout), _data(), settings, seed=0, env=env, loss_fn=loss_fn, state_dir=state_dir)
    if env.is_main:
        torch.save(model.state_dict(), out)
    return model.state_dict()


def _one_process(tmp_path, name="w1.pt", **kwargs):
    return launch(TARGET, {"out": str(tmp_path / name), "world_size": 1, "lr": 0.05, **kwargs}, 1, threads=1)


def _launch2(tmp_path, name, log="train.log", **kwargs):
    out = tmp_path / name
    args = {"out": str(out), "world_size": 2, "lr": 0.05, **kwargs}
    launch(TARGET, args, 2, threads=2, log_path=str(tmp_path / log), timeout_s=TIMEOUT_S)
    return torch.load(out, weights_only=True)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def workers_see_tests(monkeypatch):
    """The torchrun workers import this test module: put tests/ on their PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p))


def _uninterrupted(tmp_path_factory, **kwargs):
    d = tmp_path_factory.mktemp("ddp")
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p))
    try:
        state = _launch2(d, "ref.pt", **kwargs)
    finally:
        mp.undo()
    return state, (d / "train.log").read_text()


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    """(state_dict, log text) of one uninterrupted 2-process run."""
    return _uninterrupted(tmp_path_factory)


@pytest.fixture(scope="module")
def two_process_dropout(tmp_path_factory):
    """(state_dict, log text) of one uninterrupted 2-process run of the model with dropout."""
    return _uninterrupted(tmp_path_factory, dropout=True)


# ---- in-process: sharding, determinism, resume and its refusal ----


@pytest.mark.parametrize("n, world", [(16, 2), (5, 2), (7, 3), (3, 3), (1, 1)])
def test_shards_cover_the_batch_contiguously(n, world):
    bounds = [shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_steps_per_epoch_skip_only_a_last_batch_smaller_than_the_world():
    assert steps_per_epoch(101, 16, 1) == 7 and steps_per_epoch(101, 16, 2) == 7
    assert steps_per_epoch(97, 16, 2) == 6 and steps_per_epoch(97, 16, 1) == 7  # last batch of 1


def test_one_process_is_deterministic(tmp_path, one_thread):
    assert _equal(_one_process(tmp_path), _one_process(tmp_path, "again.pt"))


def test_resume_of_a_finished_run_and_refusal_of_another_run(tmp_path, one_thread, caplog):
    state_dir = tmp_path / "state"
    first = _one_process(tmp_path, state_dir=str(state_dir))
    assert (state_dir / STATE_FILE).is_file()  # kept after fit: the caller removes it once its output exists
    saved = torch.load(state_dir / STATE_FILE, weights_only=True)
    assert saved["epoch"] == EPOCHS and _equal(saved["model"], first)
    with caplog.at_level(logging.INFO, logger="mpqflow"):
        again = _one_process(tmp_path, state_dir=str(state_dir))
    assert _equal(again, first)
    assert f"{EPOCHS} of {EPOCHS} epochs done" in caplog.text and "train epoch" not in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mpqflow"):  # another learning rate: another run
        other = _one_process(tmp_path, "o.pt", lr=0.02, state_dir=str(state_dir))
    assert "not resuming" in caplog.text and "belongs to another run" in caplog.text
    assert f"train epoch {EPOCHS}/{EPOCHS}" in caplog.text  # trained from scratch
    fresh = _one_process(tmp_path, "f.pt", lr=0.02)
    assert _equal(other, fresh) and not _equal(other, first)
    assert torch.load(state_dir / STATE_FILE, weights_only=True)["fingerprint"] != saved["fingerprint"]


def test_interrupted_one_process_run_resumes_bit_for_bit(tmp_path, one_thread):
    """A run stopped after its second epoch (exception mid-epoch 3) resumes to the uninterrupted result."""
    state_dir = tmp_path / "state"
    reference = _one_process(tmp_path)

    class Stop(Exception):
        pass

    def stopping(model, x, y, calls=[0]):  # noqa: B006 - the call counter
        calls[0] += 1
        if calls[0] == 2 * STEPS + 3:
            raise Stop
        return cross_entropy_loss(model, x, y)

    env = DistEnv(0, 1, 0, torch.device("cpu"), float("inf"))
    with pytest.raises(Stop):
        fit(_model(), _data(), _settings(1), seed=0, env=env, loss_fn=stopping, state_dir=state_dir)
    assert torch.load(state_dir / STATE_FILE, weights_only=True)["epoch"] == 2
    resumed = fit(_model(), _data(), _settings(1), seed=0, env=env, state_dir=state_dir).state_dict()
    assert _equal(resumed, reference)


def test_progress_shows_every_step_of_each_epoch_and_changes_no_result(tmp_path, one_thread, monkeypatch):
    """The step bar (redrawn at every step here, not every 30 s as into a log) shows the steps within
    each epoch with the running loss; without it the run gives the same weights bit for bit."""
    env = DistEnv(0, 1, 0, torch.device("cpu"), float("inf"))
    monkeypatch.setattr(loop, "PROGRESS_INTERVAL_LOG_S", 0.0)
    shown = tmp_path / "progress.log"
    with open(shown, "w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        with_bar = fit(_model(), _data(), _settings(1), seed=0, env=env).state_dict()
    text = shown.read_text()
    for epoch in range(1, EPOCHS + 1):
        for step in range(STEPS + 1):
            assert f"train epoch {epoch} of {EPOCHS}: " in text and f"| {step}/{STEPS} [" in text, text
    assert re.search(r"loss \d+\.\d{3}\]", text), text
    monkeypatch.setattr(loop, "_step_bar", lambda label, steps, env: loop.tqdm(disable=True))
    assert _equal(fit(_model(), _data(), _settings(1), seed=0, env=env).state_dict(), with_bar)


# ---- real 2-process runs (torchrun, gloo) ----


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(two_process, tmp_path, one_thread):
    ddp, _ = two_process
    single = _one_process(tmp_path)
    assert ddp.keys() == single.keys()
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not _equal(ddp, _model().state_dict())  # it trained


@pytest.mark.slow
def test_two_process_run_is_deterministic_and_only_rank_0_logs(
    two_process, two_process_dropout, tmp_path, workers_see_tests
):
    _, log = two_process
    dropped, _ = two_process_dropout  # dropout: each rank draws its own masks from its own RNG
    assert _equal(_launch2(tmp_path, "again.pt", dropout=True), dropped)
    epoch_lines = [line for line in log.splitlines() if " train epoch " in line]
    assert len(epoch_lines) == EPOCHS and "samples/s" in epoch_lines[0] and "[rank" not in epoch_lines[0]
    for epoch in range(1, EPOCHS + 1):  # rank 0's step bar reaches the log through torchrun's pipe
        bar = [line for line in log.splitlines() if line.startswith(f"train epoch {epoch} of {EPOCHS}: ")]
        assert bar and f"| 0/{STEPS} [" in bar[0] and f"| {STEPS}/{STEPS} [" in bar[-1], log
        assert len(bar) <= 3, log  # redrawn every 30 s into a log: start, end and at most one more
    assert "hello from rank 0" in log and "hello from rank 1" not in log
    assert "[rank 1] rank 1 warns" in log  # other ranks keep their warnings


@pytest.mark.slow
def test_killed_rank_fails_the_launch_and_the_rerun_resumes(two_process_dropout, tmp_path, workers_see_tests):
    """With dropout: the rerun also restores each rank's own RNG state."""
    ddp, _ = two_process_dropout
    state_dir = str(tmp_path / "state")
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as err:  # rank 1 dies in the middle of epoch 2
        _launch2(tmp_path, "killed.pt", state_dir=state_dir, die_at=STEPS + 3, dropout=True)
    assert time.monotonic() - t0 < LAUNCH_LIMIT_S
    # usually "(the first failure)"; rank 0, failing on the lost connection, may be reported at the same moment
    assert "rank 1 exited with exit code 17" in str(err.value)
    assert not (tmp_path / "killed.pt").exists()
    assert torch.load(Path(state_dir) / STATE_FILE, weights_only=True)["epoch"] == 1
    resumed = _launch2(tmp_path, "resumed.pt", log="resumed.log", state_dir=state_dir, dropout=True)
    assert f"1 of {EPOCHS} epochs done" in (tmp_path / "resumed.log").read_text()
    assert _equal(resumed, ddp)


@pytest.mark.slow
def test_hung_rank_fails_the_launch_after_the_process_group_timeout(tmp_path, workers_see_tests):
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as err:  # rank 1 stops answering; rank 0 waits TIMEOUT_S in a collective
        _launch2(tmp_path, "hung.pt", hang_at=4)
    elapsed = time.monotonic() - t0
    assert TIMEOUT_S <= elapsed < LAUNCH_LIMIT_S, elapsed
    assert "rank 0 exited with exit code 1 (the first failure)" in str(err.value)
    assert "rank 0 of 2 failed" in str(err.value)


# ---- the stage, the rule's resources and the config checks ----

RAW = {
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "models": {"m": {"arch": "digits_cnn", "dataset": {"name": "digits"}, "train": {"epochs": 1, "lr": 0.1}}},
    "quant": {"calibration_samples": 64},
    "sensitivity": {"batch_size": 16, "pool_batches": 2},
    "study": {"set_sizes": [1], "sets_per_size": 1},
}


def _raw(**train):
    """RAW with these models.m.train keys."""
    return {**RAW, "models": {"m": {**RAW["models"]["m"], "train": {**RAW["models"]["m"]["train"], **train}}}}


@pytest.mark.slow
def test_stage_trains_on_two_processes_and_removes_its_epoch_state(tmp_path):
    cfg = Config.from_dict(validate_config(_raw(world_size=2)))
    out, state_dir = tmp_path / "model.pt", tmp_path / ".train_state"
    metrics = train_or_load(
        cfg.models["m"], 0, cfg.evaluation, Runtime("cpu", 2, 600.0), str(out), state_dir=str(state_dir)
    )
    assert 0.3 < metrics["top1"] <= 1.0 and load_checkpoint(out)["fp_metrics"] == metrics
    assert not state_dir.exists()  # removed once the checkpoint was written


def test_config_world_size_default_and_checks(monkeypatch):
    train = validate_config(RAW)["models"]["m"]["train"]
    assert train["world_size"] == 1 and train["amp"] is False
    with pytest.raises(ConfigError, match=r"'models.m.train.world_size': 4 processes need a batch_size of at least 4"):
        validate_config(_raw(world_size=4, batch_size=2))
    with pytest.raises(ConfigError, match="'models.m.train.world_size'"):
        validate_config(_raw(world_size=0))
    monkeypatch.setattr(mpqflow.validation, "cuda_available", lambda: True)
    monkeypatch.setattr(mpqflow.validation, "cuda_device_count", lambda: 1)
    cuda = {**_raw(world_size=2), "device": "cuda"}
    with pytest.raises(ConfigError, match=r"'models.m.train.world_size': 2 training processes .* need 2 GPUs"):
        validate_config(cuda)
    assert validate_config(cuda, local=False)["models"]["m"]["train"]["world_size"] == 2  # a cluster's nodes
    monkeypatch.setattr(mpqflow.validation, "cuda_device_count", lambda: 2)
    validate_config(cuda)


@pytest.mark.parametrize("device, gpus", [("cpu", 0), ("cuda", 2)])
def test_train_rule_asks_for_world_size_cpus_and_gpus(tmp_path, device, gpus):
    """A dry run (no job, no device check): train_model's threads are world_size x threads, its gpu
    resource world_size with device cuda."""
    raw = {**_raw(world_size=2), "device": device, "threads": 2}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    snakefile, config = HERE.parent / "Snakefile", tmp_path / "c.yaml"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--cores", "8", "--directory",
           str(tmp_path), "--configfile", str(config), "-n", "results/m/model.pt"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = proc.stdout.split("rule train_model:")[1].split("\n\n")[0]
    assert "threads: 4" in job and f"gpu={gpus}," in job, job
