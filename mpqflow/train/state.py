"""Epoch checkpoints of a training run, for resuming it where it stopped.

Usage (what :func:`mpqflow.train.loop.fit` does):
    fp = fingerprint(model, settings, seed=0, world_size=2, samples=len(train_set), desc="train")
    state = load_state(state_dir, fp)         # None: nothing to resume (the log says why)
    save_state(state_dir, {..., "epoch": 3, "fingerprint": fp})   # rank 0, after each epoch
    clear_state(state_dir)                    # the caller, once its output exists

One file, `state_dir/epoch.pt`, replaced atomically after every epoch: model, optimizer, scheduler,
the shared sampling generator, every rank's global torch RNG state (dropout), the number of finished
epochs and the run's fingerprint. A run resumes from it only when the fingerprint matches: the same
settings, seed, world size, data size, description, caller tag and initial weights; any other file
is ignored (and replaced at the end of the first epoch). The file outlives `fit`: a run killed after
training (while its output is evaluated or written) resumes at the end instead of training again;
the caller removes it with :func:`clear_state` once its output exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from ..io import save_torch

__all__ = ["STATE_FILE", "fingerprint", "load_state", "save_state", "clear_state"]
log = logging.getLogger("mpqflow")

STATE_FILE = "epoch.pt"
_KEYS = {"model", "optimizer", "scheduler", "generator", "torch_rng", "epoch", "fingerprint"}


def _settings_dict(settings) -> dict:
    if hasattr(settings, "to_dict"):
        return settings.to_dict()
    if dataclasses.is_dataclass(settings):
        return dataclasses.asdict(settings)
    return dict(vars(settings))


def fingerprint(
    model: torch.nn.Module, settings, *, seed: int, world_size: int, samples: int, desc: str, tag: str = ""
) -> str:
    """16 hex chars identifying a run: settings, seed, world size, data size, desc, tag and the
    initial state_dict (names, shapes, dtypes and bytes), so a new starting point never resumes an old run."""
    h = hashlib.sha256()
    meta = {
        "settings": _settings_dict(settings),
        "seed": seed,
        "world_size": world_size,
        "samples": samples,
        "desc": desc,
        "tag": tag,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_state(state_dir: str | Path | None, expected: str, *, verbose: bool = True) -> dict | None:
    """The epoch checkpoint in `state_dir` if it belongs to the run `expected`, else None.

    A missing file says nothing; an unreadable one or another run's is logged (when `verbose`) and
    ignored: the run starts from scratch and replaces it after its first epoch."""
    if state_dir is None:
        return None
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: never fatal, the run just starts over
        if verbose:
            log.info("not resuming from %s: unreadable (%s); starting from scratch", path, err)
        return None
    if not isinstance(state, dict) or not _KEYS <= set(state):
        if verbose:
            log.info("not resuming from %s: not an mpqflow epoch checkpoint; starting from scratch", path)
        return None
    if state["fingerprint"] != expected:
        if verbose:
            log.info(
                "not resuming from %s: it belongs to another run (fingerprint %s, this run %s: settings, seed, "
                "world size, data or initial weights differ); starting from scratch",
                path,
                state["fingerprint"],
                expected,
            )
        return None
    return state


def save_state(state_dir: str | Path, state: dict) -> None:
    """Write the epoch checkpoint atomically (rank 0 only)."""
    missing = _KEYS - set(state)
    if missing:
        raise ValueError(f"epoch checkpoint lacks {sorted(missing)}")
    save_torch(Path(state_dir) / STATE_FILE, state)


def clear_state(state_dir: str | Path | None) -> None:
    """Remove the epoch checkpoint (and `state_dir` if that leaves it empty)."""
    if state_dir is None:
        return
    path = Path(state_dir) / STATE_FILE
    path.unlink(missing_ok=True)
    try:
        Path(state_dir).rmdir()
    except OSError:
        pass  # missing, or holds something else
