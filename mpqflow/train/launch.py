"""Start a data-parallel job: in this process for one rank, through torchrun for several.

Usage (what a stage calls; the target writes its own outputs from rank 0):
    launch("mpqflow.stages.train:train_job", {"out_path": "results/m/model.pt", ...}, world_size=2,
           threads=4, log_path=None, timeout_s=600, device="cpu")

world_size 1 calls `function(**kwargs, env=env)` here and returns its result. world_size N > 1
writes kwargs to a temporary JSON file and runs
    python -m torch.distributed.run --standalone --nproc_per_node N -m mpqflow.train.worker TARGET JOB.json
with OMP_NUM_THREADS = max(1, threads // N); the workers' output (rank 0's log, the other ranks'
warnings, torchrun's own messages) is copied line by line to `log_path` (appended) or, when None, to
this process's stderr (a rule's log after io.setup_logging). Results come back as files: the target
writes them on rank 0 and `launch` returns None. A failed rank fails the launch with a LaunchError that
names the ranks and their exit codes and quotes the end of the output; a rank that hangs is stopped by
the process-group timeout (`timeout_s`), which fails its peers and so the launch.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .distributed import init_distributed, shutdown

__all__ = ["LaunchError", "launch"]

_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the mpqflow package
_TAIL_LINES = 80  # of the output, kept to find torchrun's failure report
_QUOTED_LINES = 30  # of those, quoted in the error
_WORKER_FAILED = re.compile(r"rank \d+ of \d+ failed")  # what mpqflow.train.worker logs
# torchrun's failure report: "rank : 1 (local_rank: 1)" then "exitcode : 3 (pid: 123)"
_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


class LaunchError(RuntimeError):
    """A launched data-parallel job failed: which ranks, with which exit codes, and the end of their output."""


def launch(
    target: str,
    kwargs: dict,
    world_size: int,
    *,
    threads: int,
    log_path: str | None = None,
    timeout_s: float = 600.0,
    device: str = "cpu",
):
    """Run `target` ("package.module:function") as `function(**kwargs, env=env)` on `world_size` ranks.

    Args:
        target: the function to run on every rank; it gets the keyword `env` (a DistEnv) besides kwargs.
        kwargs: its other arguments: typed config sections (:mod:`mpqflow.config`) and JSON-ready values;
            for world_size > 1 the sections are encoded into the job file and rebuilt on every rank, so the
            target gets the same typed arguments either way.
        world_size: processes on this node (torchrun's nproc_per_node).
        threads: CPU threads of the whole job; each rank gets max(1, threads // world_size).
        log_path: file the workers' output is appended to; None = this process's stderr.
        timeout_s: the process-group timeout (a dead or hung rank fails the job after at most this).
        device: auto | cpu | cuda; on CUDA, rank r uses GPU r.

    Returns the function's result for world_size 1, else None (the target writes its outputs).
    """
    # Imported here, not at the top: `python -m mpqflow.train.worker` imports this package first, and
    # the worker module must not be in sys.modules before runpy runs it (RuntimeWarning).
    from . import worker

    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    fn = worker.resolve_target(target)  # fail here, before starting processes, if the target does not exist
    if world_size == 1:
        torch.set_num_threads(max(1, threads))
        env = init_distributed(device, timeout_s)
        try:
            return fn(**kwargs, env=env)
        finally:
            shutdown(env)
    with tempfile.TemporaryDirectory(prefix="mpqflow-launch-") as tmp:
        job = Path(tmp) / "job.json"
        encoded = worker.encode_kwargs(kwargs)  # typed sections travel as their dicts, rebuilt on every rank
        job.write_text(json.dumps({"kwargs": encoded, "device": device, "timeout_s": timeout_s}))
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
            "-m", worker.__name__, target, str(job),
        ]  # fmt: skip
        rc, tail, errors = _run(cmd, _worker_env(threads, world_size), log_path)
    if rc != 0:
        raise LaunchError(_failure_message(target, world_size, rc, tail, errors))
    return None


def _worker_env(threads: int, world_size: int) -> dict:
    path = os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, threads // world_size)),
        "PYTHONPATH": path,  # the workers import this mpqflow, also where it is not installed
        "PYTHONUNBUFFERED": "1",  # their output reaches the log as it is written
    }


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """torchrun gets SIGTERM (and stops its workers) if this process dies: no orphaned training."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run(cmd: list[str], env: dict, log_path: str | None) -> tuple[int, list[str], list[str]]:
    """Run `cmd`, copying its output to the log as it comes; (exit code, last lines, workers' failure lines)."""
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    errors: list[str] = []
    sink = open(log_path, "a", buffering=1) if log_path is not None else sys.stderr
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1, preexec_fn=preexec
    )
    try:
        for line in proc.stdout:
            sink.write(line)
            tail.append(line.rstrip("\n"))
            if _WORKER_FAILED.search(line):
                errors.append(line.strip())
        return proc.wait(), list(tail), errors
    finally:
        if proc.poll() is None:  # interrupted here: do not leave torchrun and its workers behind
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        if sink is not sys.stderr:
            sink.close()
        else:
            sink.flush()


def _failure_message(target: str, world_size: int, rc: int, tail: list[str], errors: list[str]) -> str:
    """Which ranks failed with which exit codes (torchrun's report; its first failure first)."""
    text = "\n".join(tail)
    root, _, rest = text.partition("Root Cause")
    first = _FAILURE.findall(rest)
    others = [f for f in _FAILURE.findall(root) if f not in first]
    parts = [f"rank {r} exited with {_code(int(c))} (the first failure)" for r, c in first]
    parts += [f"rank {r} exited with {_code(int(c))}" for r, c in others]
    ranks = "; ".join(parts) or "torchrun did not report the failed rank"
    why = f"; the workers logged: {' / '.join(errors)}" if errors else ""
    last = "\n".join(tail[-_QUOTED_LINES:])
    return (
        f"{world_size}-process run of {target} failed (torchrun exit code {rc}): {ranks}{why}. "
        f"End of the workers' output:\n{last}"
    )


def _code(code: int) -> str:
    if code < 0:
        try:
            return f"exit code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"exit code {code}"
