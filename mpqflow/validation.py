"""Validate the workflow config against schemas/config.schema.yaml, filling in defaults.

Usage:
    cfg = validate_config(yaml.safe_load(open("config.yaml")))   # raises ConfigError naming the key
    cfg = validate_config(raw, local=False)   # jobs run elsewhere (cluster): skip the local CUDA check
    cfg = load_config("config.yaml")                              # the same, errors name the file
    python -m mpqflow.validation my.yaml                          # check a config file from the shell

The schema is the only place defaults live; :mod:`mpqflow.config` turns the validated dict into
frozen dataclasses per section. Beyond the schema, everything that can be known from the config
alone is checked here, before any job runs: weights files are torch.save files, the training split
holds the calibration samples and the pool, set sizes fit the pool, budgets are positive and not
certainly infeasible, ``device: cuda`` has a CUDA device (``local=True``). Budgets are returned in
their canonical names (``avg_bits-3.0`` -> ``avg_bits-3``), equivalent ones merged.

No torch here (nor numpy): the Snakefile calls this while building the DAG.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import jsonschema
import yaml

from .checkpoints import EXPECTED as _CHECKPOINT_EXPECTED
from .checkpoints import looks_like_torch_save
from .names import parse_option

__all__ = [
    "SCHEMA_PATH",
    "ConfigError",
    "canonical_budget",
    "check_device",
    "cuda_available",
    "cuda_device_count",
    "load_config",
    "train_samples",
    "validate_config",
]

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The config does not satisfy the schema; the message names the key and what was expected."""


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


def _message(err: jsonschema.ValidationError) -> str:
    key = _key(err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = sorted(err.schema.get("properties", {}))
        where = "" if key == "<top level>" else f" under {key!r}"
        return f"unknown config key(s) {extra}{where}; allowed: {allowed}"
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
    validator = _with_defaults(jsonschema.Draft202012Validator)(_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), _key(e.absolute_path)))
    if errors:
        raise ConfigError(_message(errors[0]))
    # Fill in defaults of nested objects whose default was set above, then validate the result.
    errors = list(validator.iter_errors(cfg))
    if errors:
        raise ConfigError(_message(errors[0]))
    _check_paths(cfg)
    cfg["budgets"] = _check_budgets(cfg, default="budgets" not in config)
    _check_ptq_options(cfg)
    _check_samples(cfg)
    _check_set_sizes(cfg)
    _check_world_size(cfg)
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


def _check_paths(cfg: dict) -> None:
    for name, m in cfg["models"].items():
        ds = m["dataset"]
        if ds["name"] != "digits":
            if not ds.get("root"):
                raise ConfigError(f"config key 'models.{name}.dataset.root': dataset {ds['name']!r} needs a local path")
            if not Path(ds["root"]).is_dir():
                raise ConfigError(
                    f"config key 'models.{name}.dataset.root': {ds['root']!r} is not an existing directory"
                )
        if m.get("weights") is not None:
            if not Path(m["weights"]).is_file():
                raise ConfigError(f"config key 'models.{name}.weights': {m['weights']!r} is not an existing file")
            if not looks_like_torch_save(m["weights"]):
                raise ConfigError(
                    f"config key 'models.{name}.weights': {m['weights']!r} is not a PyTorch checkpoint "
                    f"({_CHECKPOINT_EXPECTED})"
                )
        _check_classes(name, m)


_KNOWN_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}


def _check_classes(name: str, m: dict) -> None:
    """An ImageNet-style root has train/ and val/ with class folders; `num_classes` covers the labels."""
    ds = m["dataset"]
    classes = _KNOWN_CLASSES.get(ds["name"])
    if ds["name"] == "imagenet":
        for split in ("train", "val"):
            folder = Path(ds["root"]) / split
            if not folder.is_dir():
                raise ConfigError(
                    f"config key 'models.{name}.dataset.root': {ds['root']!r} has no {split}/ folder; an "
                    "ImageNet-style root holds train/<class>/* and val/<class>/*"
                )
        classes = sum(1 for e in os.scandir(Path(ds["root"]) / "train") if e.is_dir())
        if classes == 0:
            raise ConfigError(f"config key 'models.{name}.dataset.root': {ds['root']!r}/train has no class folders")
    if m.get("num_classes") is not None and m["num_classes"] < classes:
        raise ConfigError(
            f"config key 'models.{name}.num_classes': {m['num_classes']} is fewer than the {classes} classes of "
            f"dataset {ds['name']!r}; leave it null to take the dataset's count"
        )


BUDGET_KINDS = ("avg_bits", "size_mb", "size_rel", "gbitops", "bitops_rel")  # as mpqflow.optimize.budgets.KINDS


def _fmt_number(v: float) -> str:
    """Shortest positional decimal that round-trips through float(): 3.0 -> '3', 0.120 -> '0.12'.

    The same string as numpy.format_float_positional(v, trim="-"), which Budget.name uses
    (mpqflow.optimize.budgets._fmt), written without numpy.
    """
    s = format(Decimal(repr(float(v))), "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


def canonical_budget(name: str) -> str:
    """'avg_bits-3.0' -> 'avg_bits-3': the name Budget.parse(name).name gives (kind-value strings only)."""
    kind, _, value = str(name).partition("-")
    return f"{kind}-{_fmt_number(float(value))}"


def _check_budgets(cfg: dict, default: bool = False) -> list[str]:
    """Canonical budget names, equivalent ones merged; refuse a zero budget or a certainly infeasible avg_bits.

    `default`: the budgets are the schema's default (the config sets none), which the message says.
    """
    q = cfg["quant"]
    floor, why = min(q["w_bits"]), f"the smallest of quant.w_bits {q['w_bits']}"
    if q["fix_first_last"]:
        if q["fixed_bits"] < floor:
            floor, why = (
                q["fixed_bits"],
                f"quant.fixed_bits of the first/last layers, below every quant.w_bits {q['w_bits']}",
            )
        else:
            why += f"; the first/last layers fixed at quant.fixed_bits {q['fixed_bits']} only raise the average"
    out: list[str] = []
    for i, name in enumerate(cfg["budgets"]):
        kind, _, value = name.partition("-")
        v = float(value)
        if not v > 0:
            raise ConfigError(
                f"config key 'budgets[{i}]': {name!r} has value {value}; a budget's value must be greater than 0"
            )
        if kind == "avg_bits" and v < floor:
            raise ConfigError(
                f"config key 'budgets[{i}]': {name!r} cannot be met: the average weight bits are at least "
                f"{floor}, {why}"
                + (f" (budgets is not set, so its default {cfg['budgets']} applies)" if default else "")
            )
        canon = canonical_budget(name)
        if canon not in out:
            out.append(canon)
    return out


def _check_ptq_options(cfg: dict) -> None:
    for i, opt in enumerate(cfg.get("ptq", {}).get("options", [])):
        w, a = parse_option(opt)
        for bits, what in ((w, "weight"), (a, "activation")):
            if not 1 <= bits <= 16:
                raise ConfigError(
                    f"config key 'ptq.options[{i}]': {opt!r} has {bits} {what} bits; expected wWaA with "
                    "weight bits W and activation bits A in 1..16, e.g. w4a8"
                )


DIGITS_SAMPLES = 1797  # sklearn.datasets.load_digits
CIFAR_TRAIN_SAMPLES = 50000  # CIFAR-10 and CIFAR-100 training splits


def train_samples(dataset: dict) -> tuple[int, str] | None:
    """(size of the training split, its description) from a validated dataset section; None if unknown.

    digits: train_test_split with a float test_size holds out ceil(test_size * n) samples (sklearn's
    rule), so the training split has 1797 - ceil(test_fraction * 1797). CIFAR: 50000. ImageNet-style
    folders: unknown without listing them (the first job checks).
    """
    name = dataset["name"]
    if name == "digits":
        tf = dataset["test_fraction"]
        return DIGITS_SAMPLES - math.ceil(tf * DIGITS_SAMPLES), f"digits (test_fraction {tf})"
    if name in ("cifar10", "cifar100"):
        return CIFAR_TRAIN_SAMPLES, name
    return None


def _check_samples(cfg: dict) -> None:
    """The training split must hold the calibration samples and the sensitivity pool (disjoint)."""
    calib, pool, bs = (
        cfg["quant"]["calibration_samples"],
        cfg["sensitivity"]["pool_batches"],
        cfg["sensitivity"]["batch_size"],
    )
    need = calib + pool * bs
    for name, m in cfg["models"].items():
        known = train_samples(m["dataset"])
        if known is not None and need > known[0]:
            raise ConfigError(
                "config keys 'quant.calibration_samples', 'sensitivity.pool_batches', 'sensitivity.batch_size' "
                f"(model {name!r}): quant.calibration_samples ({calib}) + sensitivity.pool_batches ({pool}) × "
                f"sensitivity.batch_size ({bs}) = {need} exceeds the {known[0]} training samples of {known[1]}"
            )


def _check_set_sizes(cfg: dict) -> None:
    pool = cfg["sensitivity"]["pool_batches"]
    for i, n in enumerate(cfg["study"]["set_sizes"]):
        if n > pool:
            raise ConfigError(
                f"config key 'study.set_sizes[{i}]': set size {n} exceeds sensitivity.pool_batches ({pool}); "
                "a sensitivity set draws distinct batches from the pool"
            )


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


def _check_world_size(cfg: dict) -> None:
    """Every data-parallel process of a trained model gets a share of each batch: batch_size >= world_size."""
    for name, m in cfg["models"].items():
        world, batch = m["train"]["world_size"], m["train"]["batch_size"]
        if m.get("weights") is None and world > batch:
            raise ConfigError(
                f"config key 'models.{name}.train.world_size': {world} processes need a batch_size of at least "
                f"{world} (models.{name}.train.batch_size is {batch}, the global batch split over the processes)"
            )


def check_device(cfg: dict) -> None:
    """ConfigError when `device: cuda` finds no CUDA here, or fewer GPUs than a training's world_size (local jobs)."""
    if cfg["device"] == "cuda" and not cuda_available():
        raise ConfigError(
            "config key 'device': 'cuda' but this machine has no CUDA device (no NVIDIA driver found, or "
            "CUDA_VISIBLE_DEVICES hides every GPU); use 'auto' (CUDA when there is one, else the CPU) or 'cpu'"
        )
    for name, m in cfg["models"].items():
        world = m["train"]["world_size"] if m.get("weights") is None else 1
        gpus = cuda_device_count() if cfg["device"] == "cuda" and world > 1 else None
        if gpus is not None and gpus < world:
            raise ConfigError(
                f"config key 'models.{name}.train.world_size': {world} training processes with device 'cuda' need "
                f"{world} GPUs (one each); this machine shows {gpus}: lower world_size, or run the jobs on a "
                "cluster (profiles/slurm requests the GPUs)"
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
