"""Validate the workflow config against schemas/config.schema.yaml, filling in defaults.

Usage:
    cfg = validate_config(yaml.safe_load(open("config.yaml")))   # raises ConfigError naming the key
    cfg = validate_config(raw, local=False)   # jobs run elsewhere (cluster): skip the local CUDA check
    cfg = load_config("config.yaml")                              # the same, errors name the file
    python -m mpqflow.validation my.yaml                          # check a config file from the shell

The schema is the only place defaults live; :mod:`mpqflow.config` turns the validated dict into
frozen dataclasses per section. Beyond the schema, everything that can be known from the config
alone is checked before any job runs (:mod:`mpqflow.config_checks`: files, sample counts, budgets,
fine-tuning targets), and here ``device: cuda`` needs a CUDA device with a GPU per data-parallel
process (``local=True``). Budgets are returned in their canonical names (``avg_bits-3.0`` ->
``avg_bits-3``, equivalent ones merged), and ``finetune.targets`` as a list of target dicts.

No torch here (nor numpy): the Snakefile calls this while building the DAG.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import jsonschema
import yaml

from . import config_checks as checks
from .config_checks import ConfigError, canonical_budget, train_samples

__all__ = [
    "SCHEMA_PATH",
    "ConfigError",
    "canonical_budget",
    "check_device",
    "check_local_cores",
    "local_cores",
    "cuda_available",
    "cuda_device_count",
    "load_config",
    "schema_defaults",
    "train_samples",
    "validate_config",
]

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


def _with_defaults(validator_class):
    """A validator class that fills `default` values into objects as it validates (then re-validates)."""
    validate_props = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _key(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


# keys that older configs carry, and what replaced them
_REPLACED_KEYS = {
    "hawq_tol": "hawq_rel_se (stop at a relative standard error, not at a small change of the running mean)",
}


def _duplicate(items: list):
    """The first item of `items` that repeats an earlier one."""
    seen: list = []
    for item in items:
        if item in seen:
            return item
        seen.append(item)
    return None


def _message(err: jsonschema.ValidationError) -> str:
    key = _key(err.absolute_path)
    unique = [e for e in [err, *(err.context or ())] if e.validator == "uniqueItems"]
    if unique:  # "has non-unique elements" (or a oneOf that says nothing): name the entry listed twice
        e = unique[0]
        return f"config key {_key(e.absolute_path)!r}: {_duplicate(list(e.instance))!r} is listed twice; list it once"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = sorted(err.schema.get("properties", {}))
        where = "" if key == "<top level>" else f" under {key!r}"
        hints = "".join(f"; {k} was replaced by {_REPLACED_KEYS[k]}" for k in extra if k in _REPLACED_KEYS)
        return f"unknown config key(s) {extra}{where}; allowed: {allowed}{hints}"
    items = [e for e in err.context or () if e.validator in ("oneOf", "anyOf") and e.schema.get("description")]
    if err.validator in ("oneOf", "anyOf") and items:  # the list branch fits but an item does not: name the item
        return _message(items[0])
    if err.validator in ("oneOf", "anyOf") and err.schema.get("description"):
        # "is not valid under any of the given schemas" says nothing: name what the key expects.
        return f"config key {key!r}: {err.instance!r} is not valid; expected {err.schema['description']}"
    if err.validator == "pattern" and err.schema.get("description"):
        # A regular expression is no help to the reader: say in words what the key expects.
        what = err.schema.get("title", "valid")
        return f"config key {key!r}: {err.instance!r} is not {what}; expected {err.schema['description']}"
    return f"config key {key!r}: {err.message}"


def _schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


@functools.cache
def _schema_cached() -> dict:
    return _schema()


def schema_defaults(pointer: str) -> dict:
    """The schema's defaults of the properties of one object, by a '/'-separated path of property
    names ('sensitivity', 'models/*/train') or a definition ('$defs/scheme'): the one place defaults
    live, for the code that builds a section from a partial dict (tests, library callers)."""
    node = _schema_cached()
    for part in pointer.split("/"):
        if part == "$defs":
            node = node["$defs"]
        elif part == "*":
            node = node["additionalProperties"]
        else:
            node = node["properties"][part] if "properties" in node else node[part]
    return copy.deepcopy({k: v["default"] for k, v in node.get("properties", {}).items() if "default" in v})


def validate_config(config: Mapping, *, local: bool = True) -> dict:
    """Validate `config` and check what the config alone determines; raise ConfigError on the first problem.

    Args:
        config: the raw config mapping (e.g. Snakemake's ``config``); not modified.
        local: jobs run on this machine, so ``device: cuda`` needs a CUDA device here. Pass False
            where jobs run elsewhere (cluster executors: the submit host may have no GPU).

    Returns a copy with the defaults filled in, budgets in canonical form (equivalent ones merged,
    first occurrence's order kept) and every mapping's keys sorted: rule params derived from it
    (and so Snakemake's params rerun trigger) do not depend on the key order of the YAML.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"the config must be a mapping of config keys, got a {type(config).__name__}")
    cfg = copy.deepcopy(dict(config))
    if "ptq" in cfg and cfg["ptq"] is None:  # `ptq: null` turns the PTQ study off, like `variants: []`
        cfg["ptq"] = {"variants": []}
    if "finetune" in cfg and cfg["finetune"] is None:  # `finetune: null` fine-tunes nothing, like `targets: []`
        cfg["finetune"] = {"targets": []}
    validator = _with_defaults(jsonschema.Draft202012Validator)(_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), _key(e.absolute_path)))
    if errors:
        raise ConfigError(_message(errors[0]))
    # Fill in defaults of nested objects whose default was set above, then validate the result.
    errors = list(validator.iter_errors(cfg))
    if errors:
        raise ConfigError(_message(errors[0]))
    checks.check_paths(cfg)
    cfg["budgets"] = checks.check_budgets(cfg, default="budgets" not in config)
    checks.check_ptq_options(cfg)
    checks.check_samples(cfg)
    checks.check_set_sizes(cfg)
    checks.check_hawq(cfg)
    checks.check_world_size(cfg)
    checks.check_gradquant(cfg)
    checks.check_limpq(cfg)
    checks.check_latency(cfg)
    cfg["finetune"] = checks.check_finetune(cfg)
    if local:
        check_device(cfg)
    return _sorted_keys(cfg)


def _sorted_keys(obj):
    """`obj` with the keys of every nested mapping in sorted order (lists keep their order)."""
    if isinstance(obj, dict):
        return {k: _sorted_keys(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_sorted_keys(v) for v in obj]
    return obj


def cuda_available() -> bool:
    """Whether this machine has a CUDA device, judged without torch (tests monkeypatch this).

    CUDA_VISIBLE_DEVICES set to "" or "-1" hides every GPU; otherwise an NVIDIA driver
    (/proc/driver/nvidia/version, /dev/nvidiactl), WSL's GPU device (/dev/dxg) or ROCm's (/dev/kfd)
    counts. It can be wrong only towards True (e.g. a CPU-only torch build): then the job says so.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd"))


def cuda_device_count() -> int | None:
    """GPUs a job here sees, without torch: CUDA_VISIBLE_DEVICES' entries (at most the driver's
    /proc/driver/nvidia/gpus), else the driver's count; None when unknown (tests monkeypatch this)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    physical = sum(1 for _ in gpus.iterdir()) if gpus.is_dir() else None
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not cuda_available() or "CUDA_VISIBLE_DEVICES" not in os.environ:
        return physical if cuda_available() else 0
    return len(visible) if physical is None else min(len(visible), physical)


def local_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_local_cores(cfg: dict, cores: int | None = None, gradquant: bool = False) -> None:
    """ConfigError when a CPU run here would start more data-parallel processes than the machine has
    cores (`cores`, default :func:`local_cores`): each rank would get a fraction of a core and every
    collective would wait for a descheduled one. The sections that run in this config count: a
    trained model's `train`, `finetune` with targets, `limpq` when method limpq trains its indicators,
    and `gradquant` when the run's targets include the gradient-quantization study (`gradquant`).

    `world_size` × `threads` above the cores is no oversubscription: Snakemake caps a job's threads
    at `--cores` and each process gets threads // world_size of them (at least one)."""
    if cfg["device"] == "cuda":
        return
    cores = local_cores() if cores is None else cores
    sections = {f"models.{n}.train": m["train"] for n, m in cfg["models"].items() if m.get("weights") is None}
    if gradquant:
        sections["gradquant"] = cfg["gradquant"]
    if cfg["finetune"]["targets"]:
        sections["finetune"] = cfg["finetune"]
    if "limpq" in cfg["methods"] and cfg["limpq"]["indicators"] is None:
        sections["limpq"] = cfg["limpq"]
    for key, section in sections.items():
        if section["world_size"] > cores:
            raise ConfigError(
                f"config key '{key}.world_size': {section['world_size']} data-parallel processes on this machine's "
                f"{cores} CPU cores; expected at most {cores} (each process needs a core of its own: more make "
                "every step wait for the descheduled ones), or device: cuda with a GPU per process"
            )


def check_device(cfg: dict) -> None:
    """ConfigError when `device: cuda` finds no CUDA here, or fewer GPUs than a training's or the
    fine-tuning's world_size (local jobs)."""
    if cfg["device"] == "cuda" and not cuda_available():
        raise ConfigError(
            "config key 'device': 'cuda' but this machine has no CUDA device (no NVIDIA driver found, or "
            "CUDA_VISIBLE_DEVICES hides every GPU); use 'auto' (CUDA when there is one, else the CPU) or 'cpu'"
        )
    worlds = [
        (f"models.{name}.train.world_size", m["train"]["world_size"] if m.get("weights") is None else 1, "training")
        for name, m in cfg["models"].items()
    ]
    if cfg["finetune"]["targets"]:
        worlds.append(("finetune.world_size", cfg["finetune"]["world_size"], "fine-tuning"))
    for key, world, what in worlds:
        gpus = cuda_device_count() if cfg["device"] == "cuda" and world > 1 else None
        if gpus is not None and gpus < world:
            raise ConfigError(
                f"config key {key!r}: {world} {what} processes with device 'cuda' need {world} GPUs (one each); "
                f"this machine shows {gpus}: lower world_size, or run the jobs on a cluster (profiles/slurm "
                "requests the GPUs)"
            )


def load_config(path: str | Path, *, local: bool = True) -> dict:
    """Read a YAML config file and validate it (see validate_config); errors name the file (and line)."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_message(path, err)) from None
    if raw is None:
        raw = {}
    try:
        return validate_config(raw, local=local)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _yaml_message(path, err: yaml.YAMLError) -> str:
    """'file:line:column: not valid YAML: <problem>' from a yaml error (1-based line and column)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return f"{path}: not valid YAML ({' '.join(str(err).split())})"
    msg = f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
    context, cmark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context:
        msg += f" ({context}" + (f" at line {cmark.line + 1}, column {cmark.column + 1})" if cmark else ")")
    return msg


def main(argv=None) -> int:
    """`python -m mpqflow.validation FILE...`: validate config files; print the first error of each."""
    files = sys.argv[1:] if argv is None else argv
    if not files:
        print("usage: python -m mpqflow.validation CONFIG.yaml...", file=sys.stderr)
        return 2
    rc = 0
    for f in files:
        try:
            load_config(f)
            print(f"{f}: valid")
        except (ConfigError, OSError) as err:
            print(err, file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
