"""Where a job runs: the torch device and thread count of its Runtime settings.

Usage:
    device = resolve_device(Runtime("auto", 2, 600.0))   # cuda when available, else cpu; torch threads = 2
    gen = seed_everything(0)                      # torch and numpy seeded; a generator for sampling
"""

from __future__ import annotations

import numpy as np
import torch

from .config import Runtime

__all__ = ["resolve_device", "seed_everything"]


def resolve_device(runtime: Runtime) -> torch.device:
    """`auto` picks CUDA when available; `cuda` without a GPU is a clear error. Sets torch's threads."""
    want = runtime.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key 'device' is 'cuda' but no CUDA device is available")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(runtime.threads)
    return torch.device(want)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy; return a torch generator for sampling."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)
