"""Checks of a schema-valid config that the schema cannot state: what the config alone determines.

Usage (what :func:`mpqflow.validation.validate_config` runs after the schema, in this order):
    check_paths(cfg); cfg["budgets"] = check_budgets(cfg); check_ptq_options(cfg); check_samples(cfg)
    check_set_sizes(cfg); check_world_size(cfg); check_gradquant(cfg); check_limpq(cfg); check_latency(cfg)
    cfg["finetune"] = check_finetune(cfg)

Weights files are torch.save files, dataset roots exist with their class folders (ImageNet-style)
or CIFAR's batch files, the training split
holds the calibration samples and the pool, set sizes fit the pool, budgets are positive and not
certainly infeasible (returned in canonical names), a data-parallel batch covers its processes, and
every fine-tuning target names a decision the config makes, a latency budget has its latency table
and that table reads. Each raises ConfigError naming the key.

No torch here (nor numpy): the Snakefile runs these while building the DAG.
"""

from __future__ import annotations

import math
import os
from decimal import Decimal
from pathlib import Path

from .checkpoints import EXPECTED as _CHECKPOINT_EXPECTED
from .checkpoints import looks_like_torch_save
from .deploy.latency import LatencyTableError, read_latency_table
from .names import option_name, option_table, parse_option
from .paths import target_name, uniform_target

MAX_LSQ_BITS = 8  # mpqflow.quant.lsq.MAX_LSQ_BITS (not imported: this module stays torch-free)


class ConfigError(ValueError):
    """The config does not satisfy the schema; the message names the key and what was expected."""


def check_paths(cfg: dict) -> None:
    for name, m in cfg["models"].items():
        ds = m["dataset"]
        if ds["name"] != "digits":
            if not ds.get("root"):
                raise ConfigError(f"config key 'models.{name}.dataset.root': dataset {ds['name']!r} needs a local path")
            if not Path(ds["root"]).is_dir():
                raise ConfigError(
                    f"config key 'models.{name}.dataset.root': {ds['root']!r} is not an existing directory"
                )
            if ds["name"] in CIFAR_FILES:
                _check_cifar_layout(name, ds)
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


# The CIFAR python layout under a dataset root: (folder, training files, test files, label key);
# mpqflow.data reads it, and check_paths checks it before any job.
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def _check_cifar_layout(name: str, ds: dict) -> None:
    """A CIFAR root holds the python version's folder and every batch file of it (read in the first job)."""
    folder, train_files, test_files, _ = CIFAR_FILES[ds["name"]]
    base = Path(ds["root"]) / folder
    expected = f"expected {folder}/ with {', '.join(train_files + test_files)} (CIFAR's python version) under it"
    if not base.is_dir():
        key = f"config key 'models.{name}.dataset.root'"
        raise ConfigError(f"{key}: {ds['root']!r} has no {folder}/ folder; {expected}")
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise ConfigError(
            f"config key 'models.{name}.dataset.root': {str(base)!r} lacks {', '.join(missing)}; {expected}"
        )


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


# as mpqflow.optimize.budgets.KINDS and LATENCY_KINDS (not imported: that module needs numpy)
BUDGET_KINDS = ("avg_bits", "size_mb", "size_rel", "gbitops", "bitops_rel", "cr", "latency_ms", "latency_rel")
LATENCY_KINDS = ("latency_ms", "latency_rel")


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


def check_budgets(cfg: dict, default: bool = False) -> list[str]:
    """Canonical budget names, equivalent ones merged; refuse a zero budget or a certainly infeasible avg_bits or cr.

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
        avg = v if kind == "avg_bits" else 32.0 / v if kind == "cr" else None  # cr-r allows 32/r bits
        if avg is not None and avg < floor:
            raise ConfigError(
                f"config key 'budgets[{i}]': {name!r} cannot be met: the average weight bits are at least "
                f"{floor} (a compression ratio of at most {32 / floor:g} against FP32), {why}"
                + (f" (budgets is not set, so its default {cfg['budgets']} applies)" if default else "")
            )
        canon = canonical_budget(name)
        if canon not in out:
            out.append(canon)
    return out


def check_ptq_options(cfg: dict) -> None:
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


def check_samples(cfg: dict) -> None:
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


def check_hawq(cfg: dict) -> None:
    """HAWQ probes each layer at least hawq_min_probes times and at most hawq_max_probes: min <= max."""
    s = cfg["sensitivity"]
    if s["hawq_max_probes"] < s["hawq_min_probes"]:
        raise ConfigError(
            f"config key 'sensitivity.hawq_max_probes': {s['hawq_max_probes']} is below sensitivity.hawq_min_probes "
            f"({s['hawq_min_probes']}); expected at least as many probes at most as at least"
        )


def check_set_sizes(cfg: dict) -> None:
    pool = cfg["sensitivity"]["pool_batches"]
    for i, n in enumerate(cfg["study"]["set_sizes"]):
        if n > pool:
            raise ConfigError(
                f"config key 'study.set_sizes[{i}]': set size {n} exceeds sensitivity.pool_batches ({pool}); "
                "a sensitivity set draws distinct batches from the pool"
            )


def check_world_size(cfg: dict) -> None:
    """Every data-parallel process of a trained model gets a share of each batch: batch_size >= world_size;
    quantized gradient exchange (grad_quant) needs processes to exchange gradients between."""
    sections = {f"models.{name}.train": m["train"] for name, m in cfg["models"].items()}
    sections.update(finetune=cfg["finetune"], limpq=cfg["limpq"])
    for key, section in sections.items():
        if section.get("grad_quant") is not None and section["world_size"] < 2:
            raise ConfigError(
                f"config key '{key}.grad_quant': quantized gradient exchange needs {key}.world_size >= 2 "
                f"(it is {section['world_size']}: one process exchanges no gradients)"
            )
    for name, m in cfg["models"].items():
        world, batch = m["train"]["world_size"], m["train"]["batch_size"]
        if m.get("weights") is None and world > batch:
            raise ConfigError(
                f"config key 'models.{name}.train.world_size': {world} processes need a batch_size of at least "
                f"{world} (models.{name}.train.batch_size is {batch}, the global batch split over the processes)"
            )


def check_gradquant(cfg: dict) -> None:
    """The gradient-quantization study names configured models whose batches feed every process."""
    study = cfg["gradquant"]
    for i, name in enumerate(study["models"] or []):
        if name not in cfg["models"]:
            raise ConfigError(
                f"config key 'gradquant.models[{i}]': {name!r} is not a configured model; expected one of "
                f"{sorted(cfg['models'])}"
            )
    for name in study["models"] or cfg["models"]:
        batch = cfg["models"][name]["train"]["batch_size"]
        if study["world_size"] > batch:
            raise ConfigError(
                f"config key 'gradquant.world_size': {study['world_size']} processes need a batch_size of at least "
                f"{study['world_size']} (models.{name}.train.batch_size is {batch})"
            )


def check_limpq(cfg: dict) -> None:
    """With method limpq: an imported indicator file exists; a pretraining fits LSQ's bits and its processes."""
    if "limpq" not in cfg["methods"]:
        return
    lp, q = cfg["limpq"], cfg["quant"]
    if lp["indicators"] is not None:
        if not Path(lp["indicators"]).is_file():
            raise ConfigError(f"config key 'limpq.indicators': {lp['indicators']!r} is not an existing file")
        if lp["prune"] is not None:
            raise ConfigError(
                "config key 'limpq.prune': pruning happens during the indicator pretraining, which imported "
                "indicators (limpq.indicators) replace; set one of them to null"
            )
        return
    if lp["prune"] is not None and lp["prune"]["rewind_epoch"] >= lp["epochs"]:
        raise ConfigError(
            f"config key 'limpq.prune.rewind_epoch': {lp['prune']['rewind_epoch']} is not an epoch of the first "
            f"round; expected 0..{lp['epochs'] - 1} (limpq.epochs is {lp['epochs']})"
        )
    top = max(q["w_bits"] + q["a_bits"])
    if top > MAX_LSQ_BITS:
        raise ConfigError(
            f"config key 'quant': LIMPQ's indicator pretraining learns LSQ steps of at most {MAX_LSQ_BITS} bits, "
            f"but quant.w_bits {q['w_bits']} / quant.a_bits {q['a_bits']} reach {top}; narrow them or set "
            "limpq.indicators"
        )
    if lp["world_size"] > lp["batch_size"]:
        raise ConfigError(
            f"config key 'limpq.world_size': {lp['world_size']} processes need a batch_size of at least "
            f"{lp['world_size']} (limpq.batch_size is {lp['batch_size']}, the global batch split over the processes)"
        )


def check_latency(cfg: dict) -> None:
    """A latency budget needs latency.table; a configured table reads as one (file, columns, options,
    positive times, no duplicates) and has every configured option for some layer. Which layers it
    must have needs the layer table: :mod:`mpqflow.input_checks` checks them on the meta device."""
    path = cfg["latency"]["table"]
    for i, name in enumerate(cfg["budgets"]):
        if name.partition("-")[0] in LATENCY_KINDS and path is None:
            raise ConfigError(
                f"config key 'budgets[{i}]': {name!r} caps the latency, which needs a per-layer latency table; "
                "set config key 'latency.table' to a CSV of layer, option, ms, spread (docs/methods.md)"
            )
    if path is None:
        return
    try:
        table = read_latency_table(path)
    except LatencyTableError as err:
        raise ConfigError(f"config key 'latency.table': {err}") from None
    have = {o for _, o in table.ms}
    for o in option_table(cfg["quant"]["w_bits"], cfg["quant"]["a_bits"]):
        if o not in have:
            raise ConfigError(
                f"config key 'latency.table': {path!r} has no row at option {option_name(o)} for any layer; "
                f"expected every candidate layer at every option of quant.w_bits x quant.a_bits"
            )


def finetune_target_name(target: dict) -> str:
    """The target's path under results/<model>/finetuned/ and eval/: 'clado/set_4x0/avg_bits-2.5', 'uniform/w2a4'."""
    if target["method"] == "uniform":
        return uniform_target(target["option"])
    n, s = target["set"].split("x")
    return target_name(target["method"], int(n), int(s), target["budget"])


def check_finetune(cfg: dict) -> dict:
    """finetune with `targets` as a list of canonical target dicts (`all`: every searched decision, in
    method, set, budget order), each naming a decision or option this config makes; the batch covers
    the processes."""
    ft = dict(cfg["finetune"])
    methods = [m for m in cfg["methods"] if m != "uniform"]  # every other method searches (has an estimator)
    sets = [f"{n}x{s}" for n in cfg["study"]["set_sizes"] for s in range(cfg["study"]["sets_per_size"])]
    if ft["targets"] == "all":
        ft["targets"] = [{"method": m, "set": s, "budget": b} for m in methods for s in sets for b in cfg["budgets"]]
    options = [option_name(o) for o in option_table(cfg["quant"]["w_bits"], cfg["quant"]["a_bits"])]
    out: list[dict] = []
    for i, t in enumerate(ft["targets"]):
        key = f"config key 'finetune.targets[{i}]'"
        if t["method"] == "uniform":
            if t["option"] not in options:
                raise ConfigError(
                    f"{key}: option {t['option']!r} is not a uniform option of quant.w_bits x quant.a_bits {options}"
                )
            canon = dict(t)
        else:
            if t["method"] not in methods:
                raise ConfigError(f"{key}: method {t['method']!r} is not a search method of `methods` {methods}")
            if t["set"] not in sets:
                raise ConfigError(
                    f"{key}: set {t['set']!r} is not a sensitivity set of study.set_sizes x study.sets_per_size {sets}"
                )
            try:
                budget = canonical_budget(t["budget"])
            except ValueError:
                budget = None
            if budget not in cfg["budgets"]:
                raise ConfigError(f"{key}: budget {t['budget']!r} is not one of `budgets` {cfg['budgets']}")
            canon = {**t, "budget": budget}
        if canon in out:
            raise ConfigError(f"{key}: {finetune_target_name(canon)} is listed twice")
        out.append(canon)
    ft["targets"] = out
    if out and ft["world_size"] > ft["batch_size"]:
        raise ConfigError(
            f"config key 'finetune.world_size': {ft['world_size']} processes need a batch_size of at least "
            f"{ft['world_size']} (finetune.batch_size is {ft['batch_size']}, the global batch split over the processes)"
        )
    return ft
