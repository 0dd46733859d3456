"""The tiny workflow through a real single-node SLURM (profiles/slurm) gives what a local run gives.

The session fixture brings SLURM up with scripts/local_slurm.sh (apt-installing it if missing) and
stops it afterwards unless it was already up. Where SLURM cannot be installed the tests are skipped,
except in CI (CI=true), where that is a failure. Every wait on the scheduler has a timeout, so a
scheduler fault fails the test instead of hanging the suite.

    python -m pytest -m slurm tests/test_slurm.py
"""

import json
import math
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import snakemake_cmd, snakemake_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "local_slurm.sh"
PROFILE = REPO / "profiles" / "slurm"

BRINGUP_TIMEOUT = 240  # s: apt install (about a minute on a fresh machine) and five daemons
RUN_TIMEOUT = 600  # s: the SLURM run of the tiny config (fine-tuning included)
# Jobs per sbatch job for the tiny DAG on the 2-CPU test node: train+calibrate, then 6 estimator
# batches + 1 uniform evaluation job + 2 PTQ variants, 20 solves, 10 (method, set) evaluation jobs,
# each group in two bundles that run side by side (a bundle runs its jobs one after another on its one CPU).
GROUP_COMPONENTS = ("model=1", "calibrated=5", "solve=10", "evaluate=5")
# Values that measure the run rather than define its result: left out of the comparison.
TIMING_KEY = re.compile(r"(^|_)(seconds|time|elapsed|timestamp|date|host|hostname)$")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _in_ci():
    return os.environ.get("CI", "").lower() in ("true", "1")


def _script(action, timeout):
    return subprocess.run([str(SCRIPT), action], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-node SLURM on loopback for this session (started here unless it already answered)."""
    was_up = _script("status", 60).returncode == 0
    try:
        proc = _script("start", BRINGUP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/local_slurm.sh start took over {BRINGUP_TIMEOUT}s")
    if proc.returncode == 2:
        reason = f"SLURM is not installed and cannot be installed here: {proc.stderr.strip()}"
        if _in_ci():
            pytest.fail(f"{reason} (CI=true: the SLURM tests must run)")
        pytest.skip(reason)
    if proc.returncode != 0:
        pytest.fail(f"scripts/local_slurm.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    yield
    if not was_up:
        _script("stop", 120)


def _snakemake(workdir, *args, niceness=0):
    """Start the workflow on the tiny config in `workdir`; output goes to workdir/snakemake.out."""
    cmd = snakemake_cmd(workdir, *args)
    out = open(workdir / "snakemake.out", "w")
    # Own process group, output to a file: on a timeout the whole tree is stopped and nothing
    # left holding a pipe can block the test.
    env = snakemake_env()  # no spinning torch threads on a shared machine
    proc = subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
        preexec_fn=(lambda: os.nice(niceness)) if niceness else None,
    )
    out.close()
    return proc


def _finish(proc, workdir, what, timeout):
    """Wait for a run started by _snakemake; a timeout or a failure fails the test with its output."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # snakemake cancels its SLURM jobs on SIGINT
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        rc = f"timeout after {timeout}s"
    output = (workdir / "snakemake.out").read_text()
    if rc != 0:
        queue = subprocess.run(["squeue", "-a"], capture_output=True, text=True, timeout=30).stdout
        pytest.fail(f"{what} failed ({rc}):\n{output[-6000:]}\nsqueue:\n{queue}")
    return output


def _cancel_jobs_in(workdir):
    """Cancel any SLURM job still queued or running in `workdir` (left over by a failed run)."""
    proc = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True, timeout=30)
    ids = [line.split()[0] for line in proc.stdout.splitlines() if line.split()[1:] == [str(workdir)]]
    if ids:
        subprocess.run(["scancel", *ids], timeout=30)


@pytest.fixture(scope="module")
def runs(slurm_cluster, tiny_run, tmp_path_factory):
    """The tiny config through SLURM, against the session's local run (conftest.tiny_run), which is
    finished first so the SLURM run has the node to itself: (local dir, SLURM dir, SLURM output)."""
    slurm = tmp_path_factory.mktemp("slurm").resolve()
    node = subprocess.run(["sinfo", "-h", "-o", "%c %m"], capture_output=True, text=True, timeout=30)
    node_cpus, node_mem_mb = node.stdout.split()[:2]
    slurm_proc = _snakemake(
        slurm,
        "--workflow-profile",
        str(PROFILE),
        "--slurm-init-seconds-before-status-checks",
        "2",  # a small run: poll soon
        # One CPU per sbatch job: a bundle runs its jobs one after another, so bundles side by side
        # use the node's CPUs. No job may ask for more memory than the node has.
        "--cores",
        "1",
        "--resources",
        f"mem_mb={node_mem_mb}",
        "--group-components",
        *GROUP_COMPONENTS,
        "--retries",
        "0",  # a failure here is a bug to report, not a memory shortage to retry
        "--latency-wait",
        "10",
    )
    try:
        slurm_out = _finish(slurm_proc, slurm, "the SLURM run", RUN_TIMEOUT)
    finally:
        _cancel_jobs_in(slurm)
        if slurm_proc.poll() is None:
            os.killpg(slurm_proc.pid, signal.SIGKILL)
    return tiny_run, slurm, slurm_out


def _jobs(output):
    """(rule, is_local, [log files]) of every job snakemake reported starting."""
    jobs, current = [], None
    for line in output.splitlines():
        if m := re.match(r"\s*(localrule|rule) (\w+):$", line):
            current = (m[2], m[1] == "localrule", [])
            jobs.append(current)
        elif current and (m := re.match(r"\s+log: (.+)$", line)):
            current[2].extend(p.strip() for p in m[1].split(","))
        elif not line.startswith(" "):
            current = None
    return jobs


def test_jobs_ran_under_slurm(runs):
    _, workdir, output = runs
    submitted = set(re.findall(r"submitted with SLURM jobid (\d+)", output))
    jobs = _jobs(output)
    remote = [(rule, logs) for rule, is_local, logs in jobs if not is_local]
    assert {"train_model", "calibrate", "evaluate_uniform", "finetune", "evaluate_finetuned"} <= {r for r, _ in remote}
    # Each fine-tuning job ran its 2 data-parallel processes (torchrun, gloo) inside its one SLURM job.
    for rule, logs in remote:
        if rule == "finetune":
            text = (workdir / logs[0]).read_text()
            assert "on 2 process(es)" in text and text.count("finetune epoch 2/2") == 1, text[-2000:]
    assert submitted, "the plugin reported no submission"
    logged = set()
    for rule, logs in remote:
        assert logs, f"rule {rule} has no log"
        for log in logs:
            # a data-parallel job's torchrun worker logs the job id again: the same id, one job
            ids = sorted(set(re.findall(r"SLURM_JOB_ID=(\d+)", (workdir / log).read_text())))
            assert len(ids) == 1, f"{log} ({rule}) records {len(ids)} SLURM job ids"
            assert ids[0] in submitted, f"{log} ({rule}) ran in SLURM job {ids[0]}, which this run did not submit"
            logged.add(ids[0])
    assert logged == submitted, f"SLURM jobs {sorted(submitted - logged)} ran no logged rule"
    if "SLURM_JOB_ID" not in os.environ:  # local rules run on the submit host, outside SLURM
        for rule, is_local, logs in jobs:
            for log in logs if is_local else []:
                assert "SLURM_JOB_ID=" not in (workdir / log).read_text(), f"local rule {rule} ran under SLURM"
    # The accounting database saw every job finish, in this working directory.
    proc = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(sorted(submitted)), "-o", "JobID,State,WorkDir"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {row.split("|")[0]: row.split("|")[1:] for row in proc.stdout.splitlines()}
    assert rows == {job: ["COMPLETED", str(workdir)] for job in submitted}


def _normalize(obj, workdir):
    """Artifact content without timing fields, with the working directory replaced by a token."""
    if isinstance(obj, dict):
        return {k: _normalize(v, workdir) for k, v in obj.items() if not TIMING_KEY.search(str(k))}
    if isinstance(obj, (list, tuple)):
        return [_normalize(v, workdir) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(workdir), "{workdir}")
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    return obj


def _assert_same(a, b, where):
    """Recursive equality; floats and arrays to 1e-9 relative (the same arithmetic, maybe reordered)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a.keys() ^ b.keys())} in one run only"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {a.shape} {a.dtype} != {b.shape} {b.dtype}"
        if a.dtype.kind == "O":  # e.g. a CSV column of strings with NaN for missing cells
            _assert_same(a.ravel().tolist(), b.ravel().tolist(), where)
        elif a.dtype.kind in "fc":
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=where)
        else:
            np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)), (
            f"{where}: {a!r} != {b!r}"
        )
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _load(path):
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.suffix == ".csv":
        table = pd.read_csv(path)
        return {col: table[col].to_numpy() for col in table.columns}
    return None  # plots and reports: existence only


def test_outputs_match_local_run(runs):
    local, slurm, _ = runs
    files = sorted(p.relative_to(local) for p in (local / "results").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(slurm) for p in (slurm / "results").rglob("*") if p.is_file())
    assert {"model.pt", "calibration.pt", "uniform.csv"} <= {p.name for p in files}
    compared = 0
    for rel in files:
        a, b = _load(local / rel), _load(slurm / rel)
        if a is not None:
            _assert_same(_normalize(a, local), _normalize(b, slurm), str(rel))
            compared += 1
    assert compared >= 5
