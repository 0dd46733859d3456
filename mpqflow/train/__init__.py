"""The data-parallel trainer (torch.distributed: gloo on the CPU, NCCL on CUDA), resumable per epoch.

Usage:
    launch("mpqflow.stages.train:train_job", kwargs, world_size=2, threads=4)   # torchrun for N > 1
    env = init_distributed("cpu")                                              # inside the target
    fit(model, train_set, settings, seed=0, env=env, state_dir="results/m/.train_state")
    train_model(model, train_set, settings, seed=0, device="cpu")             # one process, no checkpoints

Modules: `distributed` (DistEnv, the process group), `loop` (fit: sampling, DDP, AMP, logging),
`state` (epoch checkpoints and their fingerprint), `launch` (in process or torchrun), `worker`
(what torchrun runs).
"""

from __future__ import annotations

from .distributed import DistEnv, init_distributed, shutdown
from .launch import LaunchError, launch
from .loop import cross_entropy_loss, fit, step_sizes_without_decay
from .state import clear_state

__all__ = [
    "DistEnv",
    "LaunchError",
    "clear_state",
    "cross_entropy_loss",
    "fit",
    "init_distributed",
    "launch",
    "shutdown",
    "step_sizes_without_decay",
    "train_model",
]


def train_model(model, train_set, cfg, seed: int, device="cpu"):
    """Train `model` in place in this process (a world of one, no epoch checkpoints); returns it in eval mode.

    The former single-process trainer's signature, for callers that need no launch: `cfg` is a
    config.TrainSettings (its world_size is not used here)."""
    import torch

    env = DistEnv(0, 1, 0, torch.device(device), float("inf"))  # no peers to wait for
    return fit(model, train_set, cfg, seed=seed, env=env)
