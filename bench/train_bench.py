"""Training throughput of the data-parallel trainer: 1 vs 2 processes on the CPU (and bf16 on/off on CUDA).

Usage:
    .venv/bin/python bench/train_bench.py                  # digits ResNet-20, 2 epochs per setting (~1-2 min)
    .venv/bin/python bench/train_bench.py --epochs 3 --threads 2 --batch-size 128

Each setting trains arch resnet20 on digits (1347 training samples, 8x8) through
mpqflow.train.launch, exactly as the train_model rule does (world size 1 in this process, 2 through
torchrun with gloo), and prints:
    fit samples/s    samples per second of `fit` itself, measured on rank 0 (epochs x samples / time)
    launch s         the whole launch: torchrun start-up, imports and process-group set-up included
Each setting is launched --repeats times (the first pays one-off start-up costs); the best is printed.
CPU settings: 1 process x `threads` threads, 1 process x threads//2, 2 processes x threads//2.
With torch.cuda.is_available(): 1 GPU with amp (bf16 autocast) off and on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (shared 2-core machine)

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mpqflow.config import TrainSettings  # noqa: E402
from mpqflow.data import DataSpec, load_split  # noqa: E402
from mpqflow.models import build_model  # noqa: E402
from mpqflow.train import launch  # noqa: E402
from mpqflow.train.distributed import DistEnv  # noqa: E402


def bench_job(out: str, epochs: int, batch_size: int, world_size: int, amp: bool, *, env: DistEnv) -> None:
    """The launch target: fit ResNet-20 on digits; rank 0 writes {seconds, samples} to `out`."""
    from mpqflow.train import fit

    train = load_split(DataSpec("digits"), "train")
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, image_size=8)
    settings = TrainSettings(
        epochs=epochs, batch_size=batch_size, lr=0.05, momentum=0.9, weight_decay=5e-4, augment_shift=1,
        world_size=world_size, amp=amp, grad_quant=None,
    )  # fmt: skip
    t0 = time.perf_counter()
    fit(model, train, settings, seed=0, env=env, desc=f"bench w{world_size}")
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    if env.is_main:
        Path(out).write_text(json.dumps({"seconds": time.perf_counter() - t0, "samples": epochs * len(train)}))


def _once(args, world_size: int, threads: int, device: str, amp: bool) -> tuple[float, float]:
    """(fit samples/s, launch seconds) of one launch."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        kwargs = {"out": str(out), "epochs": args.epochs, "batch_size": args.batch_size, "world_size": world_size}
        t0 = time.perf_counter()
        launch(
            f"{Path(__file__).stem}:bench_job", {**kwargs, "amp": amp}, world_size, threads=threads,
            log_path=os.devnull, device=device,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        r = json.loads(out.read_text())
    return r["samples"] / r["seconds"], wall


def run(name: str, args, world_size: int, threads: int, device: str = "cpu", amp: bool = False) -> None:
    """Print the best of --repeats launches of one setting."""
    rate, wall = max(_once(args, world_size, threads, device, amp) for _ in range(args.repeats))
    print(f"{name:<38} fit {rate:8.0f} samples/s   launch {wall:6.2f} s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch size")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the whole job")
    ap.add_argument("--repeats", type=int, default=2, help="launches per setting; the best is printed")
    args = ap.parse_args(argv)
    # the torchrun workers import this file as a module
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    print(
        f"resnet20 on digits, {args.epochs} epochs, global batch {args.batch_size}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    half = max(1, args.threads // 2)
    run(f"cpu 1 process x {args.threads} threads", args, 1, args.threads)
    run(f"cpu 1 process x {half} thread(s)", args, 1, half)
    run(f"cpu 2 processes x {half} thread(s) (gloo)", args, 2, args.threads)
    if torch.cuda.is_available():
        run("cuda 1 GPU, fp32", args, 1, args.threads, device="cuda", amp=False)
        run("cuda 1 GPU, bf16 autocast", args, 1, args.threads, device="cuda", amp=True)
        if torch.cuda.device_count() >= 2:
            run("cuda 2 GPUs, bf16 autocast (nccl)", args, 2, args.threads, device="cuda", amp=True)


if __name__ == "__main__":
    main()
