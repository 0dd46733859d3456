"""PyTorch checkpoint files: recognise one without torch, load a state_dict safely.

Usage:
    looks_like_torch_save("model.pt")                 # True for a torch.save file (zip or legacy pickle)
    state = load_state_dict("model.pt")               # {name: tensor}; ValueError naming the file otherwise

Both accept a bare state_dict or ``{'state_dict': ...}`` (extra keys such as an epoch beside it are
ignored). Loading uses ``torch.load(weights_only=True)``: a file that holds anything but tensors and
plain containers is refused, never unpickled with arbitrary code. torch is imported only inside
:func:`load_state_dict`, so config validation can use :func:`looks_like_torch_save` cheaply.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

__all__ = ["EXPECTED", "load_state_dict", "looks_like_torch_save", "torch_load"]

EXPECTED = "expected a file written by torch.save: a state_dict or {'state_dict': ...}"


def looks_like_torch_save(path: str | Path) -> bool:
    """Whether `path` has the format torch.save writes, judged from its bytes without torch.

    The current format is a zip archive with a ``<name>/data.pkl`` member; the legacy format is a
    pickle (protocol >= 2, so its first byte is 0x80). A README, a CSV, an .npz or an empty file is not.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except (OSError, zipfile.BadZipFile):
        return False


def _reason(err: Exception) -> str:
    """A short cause from a torch.load error, without torch's advice to set weights_only=False."""
    text = str(err)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it holds an object of type {m.group(1)}, not only tensors"
    if "Unsupported operand" in text or "invalid load key" in text:
        return "its bytes are neither a zip archive nor a pickle"
    if "PytorchStreamReader" in text:
        return "a damaged or truncated zip archive"
    if isinstance(err, EOFError):
        return "the file is empty or truncated"
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else ""
    if "weights_only" in first or "Weights only load failed" in first:
        first = ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def torch_load(path: str | Path, what: str, expected: str = EXPECTED):
    """torch.load(weights_only=True) on the CPU; FileNotFoundError or ValueError naming the file and
    `what` it should be (never suggesting weights_only=False)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 -- any unpickling or zip error: UnpicklingError, RuntimeError, EOFError
        raise ValueError(
            f"{what} file {str(path)!r} is not a PyTorch checkpoint of tensors ({_reason(err)}); {expected}"
        ) from None


def load_state_dict(path: str | Path, what: str = "weights") -> Mapping:
    """The state_dict in a torch.save file (bare or under 'state_dict'), loaded with weights_only=True.

    Args:
        path: the checkpoint file.
        what: what the file is, for messages (e.g. "weights", "model checkpoint").

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a torch.save file of tensors, or holds no state_dict; the message
            names the file (and never suggests weights_only=False).
    """
    import torch

    obj = torch_load(path, what)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what} file {str(path)!r} holds a {type(obj).__name__}, not a state_dict; {EXPECTED}")  # noqa: TRY004
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{what} file {str(path)!r} holds a dict that is not a state_dict: key {bad[0]!r} is a "
            f"{type(obj[bad[0]]).__name__}, not a tensor (keys: {sorted(map(str, obj))[:8]}); {EXPECTED}"
        )
    return obj  # as loaded: an OrderedDict keeps its _metadata (module versions) for load_state_dict
