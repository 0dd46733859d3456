"""How long a hung data-parallel rank takes to fail its job: SIGSTOP one rank of a 2-process
`train_model` job under snakemake and time until the job, and snakemake, fail.

    python bench/hung_rank_bench.py                    # about 11 minutes: the 600 s timeout and the grace
    python bench/hung_rank_bench.py --workdir /tmp/hung --epochs 400 --timeout 30   # about 1 minute

The run is the tiny test config (tests/configs/tiny.yaml) with `models.tiny.train` at world_size 2 and
enough epochs to be still training when the rank is stopped (after rank 0 logs its first epoch). A
stopped process runs no code, so it neither answers its peer nor handles the SIGTERM torchrun sends:
rank 0 fails when its collective reaches the process-group timeout (config key `collective_timeout_s`,
600 s by default; `--timeout` sets it), then torchrun sends SIGTERM to the stopped rank, waits its
grace period and sends SIGKILL. Prints, from the SIGSTOP: when rank 0's failure reached the log, when the job's log
shows torchrun's failure report, and when snakemake exited (and with what status).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
LOG = Path("logs/tiny/train_model.log")  # the rule's log, relative to the work directory
POLL_S = 0.2


def _config(workdir: Path, epochs: int, timeout_s: float | None) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["models"]["tiny"]["train"].update(epochs=epochs, world_size=2)
    if timeout_s is not None:
        cfg["collective_timeout_s"] = timeout_s
    path = workdir / "hung_rank.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _parent(pid: int) -> int | None:
    try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after its ")"
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _rank_pid(rank: int, root: int) -> int | None:
    """The pid of the torchrun worker with RANK=`rank` below process `root`. By ancestry, not by
    session: torchrun starts each worker in a session of its own."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mpqflow.train.worker" not in cmdline or f"RANK={rank}".encode() not in environ:
            continue
        pid = int(entry.name)
        while pid not in (None, 0, 1, root):
            pid = _parent(pid)
        if pid == root:
            return int(entry.name)
    return None


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="empty work directory (default: a new temp dir)")
    ap.add_argument(
        "--epochs", type=int, default=400, help="epochs of the 2-process run (still training at the SIGSTOP)"
    )
    ap.add_argument("--timeout", type=float, default=None, help="collective_timeout_s (default: the schema's)")
    ap.add_argument("--limit", type=float, default=1200.0, help="s after the SIGSTOP before giving up")
    args = ap.parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="hung-rank-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = _config(workdir, args.epochs, args.timeout)
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(config), "--cores", "2", "results/tiny/model.pt",
    ]  # fmt: skip
    print("work directory:", workdir, "\n$", " ".join(cmd), flush=True)
    out = open(workdir / "snakemake.out", "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    log = workdir / LOG
    try:
        while "train epoch 1/" not in _text(log):  # rank 0's first epoch line: training is under way
            if proc.poll() is not None:
                print(f"snakemake exited ({proc.returncode}) before training got under way; see {out.name}")
                return 1
            time.sleep(POLL_S)
        pid = _rank_pid(1, proc.pid)
        if pid is None:
            print("no rank-1 worker found")
            return 1
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        print(f"SIGSTOP to rank 1 (pid {pid})", flush=True)
        marks = {"rank 0 of 2 failed": None, "2-process run of": None}  # rank 0's failure; the job's LaunchError
        while proc.poll() is None and time.monotonic() - stopped < args.limit:
            text = _text(log)
            for key in marks:
                if marks[key] is None and key in text:
                    marks[key] = time.monotonic() - stopped
            time.sleep(POLL_S)
        if proc.poll() is None:
            print(f"snakemake still running {args.limit:.0f} s after the SIGSTOP")
            return 1
        ended = time.monotonic() - stopped
        text = _text(log)
        for key in marks:
            if marks[key] is None and key in text:
                marks[key] = ended
    finally:
        if proc.poll() is None:  # given up: the ranks first (each in a session of its own), then snakemake's
            for rank in (0, 1):
                pid = _rank_pid(rank, proc.pid)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)  # also ends a stopped process
            os.killpg(proc.pid, signal.SIGKILL)  # snakemake, its job and torchrun
            proc.wait()
        out.close()

    def fmt(s):
        return "not seen" if s is None else f"{s:.1f} s"

    print(f"rank 0 fails (its timeout):           {fmt(marks['rank 0 of 2 failed'])} after the SIGSTOP")
    print(f"the job fails (torchrun's report):    {fmt(marks['2-process run of'])} after the SIGSTOP")
    print(f"snakemake exits with {proc.returncode}:               {fmt(ended)} after the SIGSTOP")
    print("rank 1 still alive:", _rank_pid(1, proc.pid) is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
