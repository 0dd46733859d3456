"""The process group of a data-parallel run: who this process is and which device it drives.

Usage (inside a worker that torchrun started, or in a plain process as a world of one):
    env = init_distributed("auto", timeout_s=600)   # reads RANK, WORLD_SIZE, LOCAL_RANK from torchrun
    if env.is_main: ...                             # rank 0 logs and writes files
    shutdown(env)

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT, read by init_process_group).
Without them the process is rank 0 of a world of one and no process group is created: the training
loop runs the same code and skips the collectives. gloo on the CPU, NCCL on CUDA (one GPU per local
rank), always with a finite timeout, so a rank that dies or hangs fails the job instead of stalling it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "shutdown", "all_reduce_sum"]
log = logging.getLogger("mpqflow")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a data-parallel run.

    Args:
        rank: global rank, 0..world_size-1.
        world_size: number of processes.
        local_rank: rank on this node (the GPU index on CUDA).
        device: the torch device this rank computes on.
        timeout_s: the process-group timeout a collective waits for the other ranks (inf: a world of one).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: float

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs progress and writes checkpoints and outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is a process group (world_size > 1)."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def _pick_device(device: str, local_rank: int, local_world: int) -> torch.device:
    """`cpu`, `cuda` (one GPU per local rank, else an error) or `auto` (CUDA when every local rank gets a GPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected auto, cpu or cuda")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and gpus < local_world:
        raise RuntimeError(
            f"device 'cuda' with {local_world} process(es) per node needs {local_world} GPU(s); this machine "
            f"has {gpus} (config keys 'device' and models.<m>.train.world_size)"
        )
    if device == "auto":
        if 0 < gpus < local_world and local_rank == 0:
            log.warning("device auto: %d GPU(s) for %d processes; training on the CPU", gpus, local_world)
        device = "cuda" if gpus >= local_world and gpus > 0 else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "cpu", timeout_s: float = 600.0) -> DistEnv:
    """This process's DistEnv; joins the process group when torchrun started a world of several.

    Args:
        device: auto | cpu | cuda (the config's `device`); on CUDA, rank r of a node uses GPU r.
        timeout_s: how long a collective (and the rendezvous) waits for the other ranks before it
            raises: a dead or hung rank fails the run after at most this long.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive (a finite process-group timeout), got {timeout_s}")
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    dev = _pick_device(device, local_rank, local_world)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        extra = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **extra)
    return DistEnv(rank, world, local_rank, dev, timeout_s)


def shutdown(env: DistEnv, *, wait: bool = False) -> None:
    """Leave the process group (if any).

    wait: first wait for every rank (after a success: rank 0 may still be writing its outputs). A rank
    that destroyed its gloo group and exited while a peer still used it was seen to abort the peer
    ("terminate called without an active exception"), failing a finished job. After a failure there is
    no waiting: the peers fail on their own within the process-group timeout.
    """
    if env.distributed and dist.is_initialized():
        if wait and env.device.type == "cuda":
            dist.barrier(device_ids=[env.local_rank])  # NCCL: name the GPU, or the barrier guesses
        elif wait:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few numbers over the ranks (float64); a world of one returns them unchanged."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()
