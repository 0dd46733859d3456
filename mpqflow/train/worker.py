"""One rank of a launched run: `python -m mpqflow.train.worker TARGET JOB.json` (torchrun starts N).

TARGET is "package.module:function"; JOB.json holds {"kwargs": {...}, "device": ..., "timeout_s": ...}
as :func:`mpqflow.train.launch.launch` writes it, typed config sections encoded by :func:`encode_kwargs`
and rebuilt here by :func:`decode_kwargs`, so a target takes the same typed arguments on any number
of ranks. The worker joins the process group, calls
`function(**kwargs, env=env)` and leaves. Rank 0 logs at INFO (to stderr, which the launcher copies
into the rule's log); the other ranks log warnings and errors only, marked with their rank. A failure
is logged with its traceback as "rank R of W failed: <exception>" and exits with status 1 (torchrun then
stops the other ranks).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

from ..config import Section
from ..io import setup_logging
from .distributed import DistEnv, init_distributed, shutdown

__all__ = ["resolve_target", "encode_kwargs", "decode_kwargs", "main"]
log = logging.getLogger("mpqflow")


def resolve_target(target: str):
    """The function named by "package.module:function"."""
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"target {target!r}: expected 'package.module:function'")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"target {target!r}: {module} has no function {name!r}")
    return fn


_SECTION = "__mpqflow_section__"  # the key that marks an encoded config section in JOB.json


def encode_kwargs(value):
    """`value` as JSON-ready data: each typed config section (:mod:`mpqflow.config`, the method
    settings) becomes {_SECTION: "module:Class", "fields": its to_dict()}, inside dicts and lists too."""
    if isinstance(value, Section):
        return {_SECTION: f"{type(value).__module__}:{type(value).__qualname__}", "fields": value.to_dict()}
    if isinstance(value, dict):
        return {k: encode_kwargs(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_kwargs(v) for v in value]
    return value


def decode_kwargs(value):
    """The inverse of :func:`encode_kwargs`: every encoded section rebuilt by its class's from_dict
    (which checks every key again)."""
    if isinstance(value, dict) and _SECTION in value:
        module, _, name = value[_SECTION].partition(":")
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, Section)):
            raise ValueError(f"job file: {value[_SECTION]!r} is not a config section")
        return cls.from_dict(value["fields"])
    if isinstance(value, dict):
        return {k: decode_kwargs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_kwargs(v) for v in value]
    return value


def _setup_logging(env: DistEnv) -> None:
    """Rank 0 logs like a single-process job; the others only warnings and errors, with their rank."""
    if env.is_main:
        setup_logging(None)
        return
    logger = logging.getLogger("mpqflow")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {env.rank}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run one rank; 0 on success, 1 (after logging the traceback) on failure."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m mpqflow.train.worker package.module:function JOB.json", file=sys.stderr)
        return 2
    target, job_path = argv
    job = json.loads(Path(job_path).read_text())
    env = init_distributed(job["device"], job["timeout_s"])
    _setup_logging(env)
    try:
        resolve_target(target)(**decode_kwargs(job["kwargs"]), env=env)
    except BaseException as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        log.exception("rank %d of %d failed: %s: %s", env.rank, env.world_size, type(err).__name__, first)
        shutdown(env)
        return 1
    shutdown(env, wait=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
