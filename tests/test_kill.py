"""A SIGKILLed sensitivity job leaves no partial artifact, and `--rerun-incomplete` then gives exactly
what an uninterrupted run gives (issue 5, item 4).

The tiny workflow up to the pooled CLADO set (train, calibrate, two CLADO batch files, pooling) runs
in its own process group; as soon as a `sensitivity_batch` job is running (its log exists, its
output does not yet) the whole group (snakemake and the job) gets SIGKILL. Every artifact under a
final output name must then load whole (they are written to a hidden temp name and renamed), the
killed job's output must be absent, and (after `--unlock`, as the killed snakemake left its lock)
a `--rerun-incomplete` run must produce artifacts equal, array by array and bit for bit, to those
of the session's uninterrupted tiny run (conftest.tiny_run). Every wait has a timeout.

    python -m pytest -m slow tests/test_kill.py
"""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import snakemake_cmd, snakemake_env

TARGET = "results/tiny/sensitivity/clado/set_2x0.npz"
SENS = "results/tiny/sensitivity/clado"
RUN_TIMEOUT = 300  # s: one run up to the target (about 30 s)
ATTEMPTS = 3  # kill attempts: a job can finish between the check and the kill (it takes about 1 s)

pytestmark = pytest.mark.slow


def _start(workdir, *args):
    cmd = snakemake_cmd(workdir, "--cores", "2", *args, TARGET)
    out = open(workdir / "snakemake.out", "a")
    env = snakemake_env()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    out.close()
    return proc


def _kill_group(proc, timeout=30):
    """SIGKILL the process group of `proc` and wait until no process of it is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process group {proc.pid} still alive {timeout}s after SIGKILL"
        time.sleep(0.05)


def _finish(proc, workdir, what):
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc = f"timeout after {RUN_TIMEOUT}s"
    if rc != 0:
        pytest.fail(f"{what} failed ({rc}):\n{(workdir / 'snakemake.out').read_text()[-6000:]}")


def _unlock(workdir):
    """Remove the lock a SIGKILLed snakemake leaves (the documented recovery before a rerun)."""
    _finish(_start(workdir, "--unlock"), workdir, "snakemake --unlock")


def _running_batch(workdir):
    """The output path of a sensitivity_batch job that has started (log) and not finished (no output)."""
    logs = workdir / "logs" / "tiny" / "sensitivity" / "clado"
    for log in sorted(logs.glob("batch_*.log")) if logs.is_dir() else []:
        out = workdir / SENS / f"{log.stem}.npz"
        if not out.exists():
            return out
    return None


def _final_files(workdir):
    """Every file under a final output name: results/ without the hidden temp files of atomic writes."""
    return sorted(
        p.relative_to(workdir) for p in (workdir / "results").rglob("*") if p.is_file() and not p.name.startswith(".")
    )


def _load(path):
    """The artifact's content; raises if the file is truncated or otherwise unreadable."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    raise AssertionError(f"unexpected artifact type: {path}")


def _same(a, b, where):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_killed_sensitivity_job_reruns_to_identical_results(tmp_path, tiny_run):
    """The uninterrupted reference is the session's complete tiny run (conftest.tiny_run)."""
    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    killed = None
    for attempt in range(ATTEMPTS):
        if attempt:
            _unlock(killed_dir)
        proc = _start(killed_dir, "--rerun-incomplete")
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while (running := _running_batch(killed_dir)) is None:
                assert proc.poll() is None, (
                    f"the run ended ({proc.returncode}) before a sensitivity job was seen running:\n"
                    + (killed_dir / "snakemake.out").read_text()[-4000:]
                )
                assert time.monotonic() < deadline, f"no sensitivity job running within {RUN_TIMEOUT}s"
                time.sleep(0.02)
        finally:
            _kill_group(proc)
        if not running.exists():  # killed mid-job, not just after it
            killed = running
            break
        (killed_dir / "snakemake.out").open("a").write(f"\n[test] attempt {attempt}: {running} finished first\n")
    assert killed is not None, f"every one of {ATTEMPTS} kills came after the job had finished"

    # Nothing partial under a final name: every artifact loads; the killed job's output is absent.
    assert not (killed_dir / TARGET).exists()
    for rel in _final_files(killed_dir):
        _load(killed_dir / rel)
    assert not killed.exists()

    _unlock(killed_dir)
    _finish(_start(killed_dir, "--rerun-incomplete"), killed_dir, "the --rerun-incomplete run")

    # Every artifact of the resumed run (the target and all it needs) equals the uninterrupted run's.
    files = _final_files(killed_dir)
    assert TARGET in map(str, files) and str(killed.relative_to(killed_dir)) in map(str, files)
    assert {"model.pt", "calibration.pt"} <= {p.name for p in files}
    for rel in files:
        _same(_load(tiny_run / rel), _load(killed_dir / rel), str(rel))
