"""Atomic artifact writing and reading: every output appears whole under its final name or not at all.

Usage:
    save_json(path, {"top1": 0.98})            # temp file in the same directory, fsync, rename
    save_torch(path, state_dict)
    save_npz(path, G=G, count=n)
    with atomic_path("plot.png") as tmp: fig.savefig(tmp)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import sys
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "atomic_path",
    "save_json",
    "load_json",
    "load_record",
    "DamagedArtifact",
    "damaged",
    "regenerate_remedy",
    "save_torch",
    "save_npz",
    "load_npz",
    "setup_logging",
    "file_sha256",
    "save_csv",
    "load_csv",
]


def _create_temp(path: Path, suffix: str) -> Path:
    """Create an empty, new file next to `path` with mode 0o666 & ~umask (what `open(path, "w")` gives).

    The kernel applies the umask (and a directory's default ACL) at O_CREAT, so the umask is never
    read or changed; `tempfile.mkstemp` would force 0o600, unreadable to colleagues on a shared file system.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The file ends up with the mode a plain `open(path, "w")` gives (0o666 & ~umask); a failing block
    leaves neither `path` (if it did not exist) nor the temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path, suffix or path.suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _jsonable(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_json(path: str | Path, data) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")


def save_csv(path: str | Path, df, float_format: str | None = "%.6g") -> None:
    """A pandas DataFrame as CSV (no index; floats to 6 significant digits unless float_format=None), atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format=float_format)


class DamagedArtifact(ValueError):
    """An artifact that cannot be read as what it should be (truncated, another format, fields missing,
    edited); the message names the file, the fault and the remedy."""


def regenerate_remedy(path: str | Path) -> str:
    """How to remake a workflow artifact in place. Deleting it alone is not enough: while the files
    made from it exist, Snakemake reports nothing to be done."""
    return (
        f"regenerate it with `snakemake --cores N --forcerun {path}` (reruns the job that writes it and "
        "every job made from it)"
    )


def damaged(path: str | Path, fault: str, remedy: str | None = None) -> DamagedArtifact:
    """The error for an artifact that cannot be read: '<path>: <fault>; <remedy>' (by default
    :func:`regenerate_remedy`). Returned, not raised, so callers write `raise damaged(...) from None`."""
    return DamagedArtifact(f"{path}: {fault}; {remedy or regenerate_remedy(path)}")


def load_csv(path: str | Path, what: str, columns=()):
    """A CSV table an earlier job wrote, as a pandas DataFrame; a file that pandas cannot parse (empty,
    truncated mid-quote, binary) or that lacks `columns` is a DamagedArtifact naming it and the remedy."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise damaged(path, f"not a readable {what} CSV ({type(err).__name__}: {err})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise damaged(path, f"not a whole {what}: column(s) {missing} missing")
    return df


def load_json(path: str | Path):
    """Read a JSON artifact; a file that is not JSON (truncated, binary, empty) is a DamagedArtifact
    naming it and the remedy."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise damaged(path, f"not valid JSON ({err})") from None


def load_record(path: str | Path, what: str, fields) -> dict:
    """A JSON object artifact that must have `fields` (e.g. an evaluation: "top1", "loss", ...); a
    DamagedArtifact naming the file, what it should be and the missing fields otherwise."""
    record = load_json(path)
    if not isinstance(record, dict):
        raise damaged(path, f"not {what} (a JSON {type(record).__name__}, expected an object)")
    missing = [f for f in fields if f not in record]
    if missing:
        raise damaged(path, f"not a complete {what}: field(s) {missing} missing")
    return record


def save_torch(path: str | Path, obj) -> None:
    """torch.save, atomically, byte for byte reproducible.

    torch.save to a path names the zip archive's root folder after the file, here the random temp
    name, so the same state would hash differently on every run; to a file object it is "archive".
    """
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def save_npz(path: str | Path, **arrays) -> None:
    """np.savez_compressed, atomically (`path` keeps its .npz name)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def load_npz(path: str | Path) -> dict:
    """All arrays of an .npz file as a dict (0-d arrays of strings become str). A file that is not a
    whole .npz (truncated, another format) is a DamagedArtifact naming it and the remedy."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise damaged(path, f"not a readable .npz file ({type(err).__name__}: {err}), damaged or truncated") from None
    return {k: (str(v) if v.dtype.kind == "U" and v.ndim == 0 else v) for k, v in out.items()}


def setup_logging(log_file: str | Path | None) -> logging.Logger:
    """Send the `mpqflow` logger and stderr (tqdm, warnings, tracebacks) to a rule's log file."""
    logger = logging.getLogger("mpqflow")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_file, "w", buffering=1)
        sys.stderr = stream
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if os.environ.get("SLURM_JOB_ID"):
        # Proof (and a pointer for `sacct`) that this job ran under the scheduler.
        logger.info("SLURM_JOB_ID=%s", os.environ["SLURM_JOB_ID"])
    return logger


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (identifies a checkpoint in every artifact)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
