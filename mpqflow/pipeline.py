"""The stages of the workflow as plain functions of (config, paths): what each workflow script calls.

Usage (what `workflow_scripts/*.py` do):
    train_or_load(cfg, "digits_resnet20", "results/digits_resnet20/model.pt")
    calibrate(cfg, "digits_resnet20", "results/.../model.pt", "results/.../calibration.pt")
    ctx = load_context(cfg, "digits_resnet20", model_pt, calibration_pt)   # model + quantizer + layer table
    metrics = evaluate_assignment(ctx, ctx.uniform_assignment((4, 8)))
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .config import option_table
from .data import DataSpec, SamplePlan, iterate, load_split, stack
from .evaluate import evaluate
from .io import save_torch
from .models import build_model, file_sha256, layer_macs, quantizable_layers
from .quant import ModelQuantizer, QuantScheme
from .quant.entropy import mean_entropy_bits
from .train import TrainConfig, seed_everything, train_model

__all__ = [
    "stage_config",
    "resolve_device",
    "data_spec",
    "sample_plan",
    "train_or_load",
    "load_model",
    "calibrate",
    "LayerTable",
    "Context",
    "load_context",
    "evaluate_assignment",
    "parse_option",
    "evaluate_uniform",
]
log = logging.getLogger("mpqflow")


def stage_config(params_cfg: dict, config: dict, threads: int) -> dict:
    """A stage's config: the sections its rule passes as params, plus execution settings (device, threads).

    Execution settings are not params, so changing them reruns nothing.
    """
    return {**params_cfg, "device": config.get("device", "auto"), "threads": threads}


def resolve_device(cfg: dict) -> torch.device:
    """`device: auto` picks CUDA when available; `cuda` without a GPU is a clear error."""
    want = cfg.get("device", "auto")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key 'device' is 'cuda' but no CUDA device is available")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(cfg.get("threads", 2))
    return torch.device(want)


def data_spec(cfg: dict, model: str) -> DataSpec:
    """The DataSpec of a configured model."""
    ds = cfg["models"][model]["dataset"]
    return DataSpec(ds["name"], ds.get("root"), ds["test_fraction"], ds["image_size"], cfg["seed"])


def sample_plan(cfg: dict, n_train: int) -> SamplePlan:
    """Calibration samples and sensitivity pool of the training split."""
    s = cfg["sensitivity"]
    return SamplePlan(n_train, cfg["quant"]["calibration_samples"], s["pool_batches"], s["batch_size"], cfg["seed"])


def _fresh_model(cfg: dict, model: str):
    spec = data_spec(cfg, model)
    return build_model(cfg["models"][model]["arch"], spec.in_channels, spec.num_classes)


def train_or_load(cfg: dict, model: str, out_path: str) -> dict:
    """Train the FP model (or load configured local weights), measure it, save the checkpoint atomically."""
    device = resolve_device(cfg)
    mcfg, spec = cfg["models"][model], data_spec(cfg, model)
    seed_everything(cfg["seed"])  # the initial weights come from the global RNG: seed it first
    net = _fresh_model(cfg, model)
    if mcfg.get("weights"):
        from .models import load_weights

        load_weights(net, mcfg["weights"])
        log.info("loaded weights from %s", mcfg["weights"])
    else:
        tcfg = TrainConfig(**mcfg["train"], seed=cfg["seed"])
        log.info("training %s on %s: %s", mcfg["arch"], spec.name, tcfg)
        train_model(net, load_split(spec, "train"), tcfg, device)
    metrics = evaluate(net.to(device), load_split(spec, "test"), cfg["evaluation"]["batch_size"], device,
                       workers=mcfg["dataset"]["workers"])
    log.info("FP test metrics: %s", metrics)
    save_torch(out_path, {"state_dict": net.cpu().state_dict(), "arch": mcfg["arch"], "fp_metrics": metrics})
    return metrics


def load_model(cfg: dict, model: str, checkpoint: str, device) -> torch.nn.Module:
    """Rebuild a configured model and load its FP checkpoint (eval mode, on `device`)."""
    net = _fresh_model(cfg, model)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net.load_state_dict(state["state_dict"])
    return net.to(device).eval()


@dataclass(frozen=True)
class LayerTable:
    """Which layers are quantized and what each costs.

    Args:
        layers: every Conv2d/Linear in execution order.
        candidates: the layers whose bit-width is searched.
        fixed: layer -> (w_bits, a_bits) for layers not searched (first/last by default).
        options: the (w_bits, a_bits) option table of every candidate layer.
        numel: weights per layer; macs: multiply-accumulates per sample per layer.
    """

    layers: tuple[str, ...]
    candidates: tuple[str, ...]
    fixed: dict
    options: tuple[tuple[int, int], ...]
    numel: dict
    macs: dict

    def weight_bits(self, assignment: dict) -> int:
        """Total weight storage in bits of a full assignment (FP layers count 32 bits)."""
        return sum(self.numel[l] * (assignment.get(l, (32, 32))[0] or 32) for l in self.layers)

    def bitops(self, assignment: dict) -> int:
        """Sum over layers of MACs * w_bits * a_bits (FP parts count 32 bits)."""
        return sum(
            self.macs[l] * (assignment.get(l, (32, 32))[0] or 32) * (assignment.get(l, (32, 32))[1] or 32)
            for l in self.layers
        )

    def to_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "candidates": list(self.candidates),
            "fixed": {k: list(v) for k, v in self.fixed.items()},
            "options": [list(o) for o in self.options],
            "numel": self.numel,
            "macs": self.macs,
        }


def layer_table(cfg: dict, net: torch.nn.Module, example: torch.Tensor) -> LayerTable:
    """Quantizable layers of `net`, with first/last fixed per config."""
    q = cfg["quant"]
    layers = tuple(quantizable_layers(net, example[:1]))
    fixed_names = (layers[0], layers[-1]) if q["fix_first_last"] and len(layers) > 2 else ()
    modules = dict(net.named_modules())
    return LayerTable(
        layers=layers,
        candidates=tuple(l for l in layers if l not in fixed_names),
        fixed={l: (q["fixed_bits"], q["fixed_bits"]) for l in fixed_names},
        options=tuple(option_table(cfg)),
        numel={l: int(modules[l].weight.numel()) for l in layers},
        macs={l: int(v) for l, v in layer_macs(net, example[:1]).items()},
    )


def _quantizer(cfg: dict, net, table: LayerTable) -> ModelQuantizer:
    q = cfg["quant"]
    w_bits = sorted({w for w, _ in table.options} | {w for w, _ in table.fixed.values()})
    a_bits = sorted({a for _, a in table.options} | {a for _, a in table.fixed.values()})
    return ModelQuantizer(
        net,
        list(table.layers),
        QuantScheme.from_dict(q["weight"]),
        QuantScheme.from_dict(q["activation"]),
        w_bits,
        a_bits,
    )


def calibrate(cfg: dict, model: str, checkpoint: str, out_path: str) -> None:
    """Calibrate every quantizer (each layer, each bit-width) on the plan's calibration samples."""
    device = resolve_device(cfg)
    seed_everything(cfg["seed"])
    spec = data_spec(cfg, model)
    train = load_split(spec, "train")
    # The calibration samples do not depend on the sensitivity pool, so growing the pool keeps them.
    plan = SamplePlan(len(train), cfg["quant"]["calibration_samples"], 0, 1, cfg["seed"])
    net = load_model(cfg, model, checkpoint, device)
    example, _ = stack(train, plan.calibration()[:2])
    table = layer_table(cfg, net, example.to(device))
    quantizer = _quantizer(cfg, net, table)
    bs = cfg["quant"]["calibration_batch_size"]
    workers = cfg["models"][model]["dataset"]["workers"]
    batches = (x.to(device) for x, _ in iterate(train, bs, plan.calibration(), workers))
    quantizer.calibrate(batches)
    save_torch(
        out_path,
        {
            "quantizer": quantizer.state_dict(),
            "table": table.to_dict(),
            "checkpoint_sha256": file_sha256(checkpoint),
            "quant_config": cfg["quant"],
        },
    )
    log.info("calibrated %d layers (%d candidates) on %d samples", len(table.layers), len(table.candidates), len(plan.calibration()))


@dataclass
class Context:
    """A loaded model with its calibrated quantizer: what sensitivity, evaluation and study stages share."""

    cfg: dict
    model_name: str
    net: torch.nn.Module
    quantizer: ModelQuantizer
    table: LayerTable
    checkpoint_sha256: str
    device: torch.device

    @cached_property
    def spec(self) -> DataSpec:
        return data_spec(self.cfg, self.model_name)

    @cached_property
    def train_set(self):
        return load_split(self.spec, "train")

    @cached_property
    def test_set(self):
        return load_split(self.spec, "test")

    @cached_property
    def plan(self) -> SamplePlan:
        return sample_plan(self.cfg, len(self.train_set))

    def full_assignment(self, candidate_options: dict) -> dict:
        """Candidate choices plus the fixed layers: {layer: (w_bits, a_bits)} over all quantized layers."""
        return {**self.table.fixed, **candidate_options}

    def uniform_assignment(self, option: tuple[int, int]) -> dict:
        """Every candidate layer at `option`, fixed layers at their fixed bits."""
        return self.full_assignment({l: tuple(option) for l in self.table.candidates})


def load_context(cfg: dict, model: str, checkpoint: str, calibration: str) -> Context:
    """Load model + calibrated quantizer; refuse a calibration made from another checkpoint or quant config."""
    device = resolve_device(cfg)
    net = load_model(cfg, model, checkpoint, device)
    calib = torch.load(calibration, map_location="cpu", weights_only=False)
    sha = file_sha256(checkpoint)
    if calib["checkpoint_sha256"] != sha:
        raise ValueError(f"{calibration} was calibrated for another checkpoint than {checkpoint}")
    if calib["quant_config"] != cfg["quant"]:
        raise ValueError(f"{calibration} was made with other quant settings than the config's 'quant' section")
    t = calib["table"]
    table = LayerTable(
        tuple(t["layers"]),
        tuple(t["candidates"]),
        {k: tuple(v) for k, v in t["fixed"].items()},
        tuple(tuple(o) for o in t["options"]),
        t["numel"],
        t["macs"],
    )
    quantizer = _quantizer(cfg, net, table)
    quantizer.load_state_dict(calib["quantizer"])
    return Context(cfg, model, net, quantizer, table, sha, device)


def _record_first_input(store: dict, name: str, module, args) -> None:
    if name not in store:
        store[name] = args[0].detach()


def _entropy_bits(ctx: Context, assignment: dict, first_inputs: dict) -> tuple[float, float]:
    """Element-weighted mean entropy (bits/element) of the quantized weights and quantized inputs."""
    weights = [ctx.quantizer.quantized_weight(l, w) for l, (w, _) in assignment.items() if w is not None]
    acts = [x for l, x in first_inputs.items() if assignment.get(l, (None, None))[1] is not None]
    return mean_entropy_bits(weights, ch_axis=0), mean_entropy_bits(acts, ch_axis=1)


def evaluate_assignment(ctx: Context, assignment: dict) -> dict:
    """Top-1/top-5/loss on the held-out split with `assignment` applied, plus size, average bits, BitOPs
    and bit-rates.

    Bit-rates (:mod:`mpqflow.quant.entropy`): ``weight_entropy_bits`` is the entropy of the quantized
    weights with one code book per output channel, element-weighted over the layers with quantized
    weights; ``act_entropy_bits`` that of the quantized layer inputs, one code book per channel (dim 1),
    measured on the FIRST evaluation batch only (a forward hook after the input quantizer), element-
    weighted over the layers with quantized inputs. Both are 0.0 when nothing of that kind is quantized.
    """
    first_inputs: dict = {}
    modules = dict(ctx.net.named_modules())
    with ctx.quantizer.applied(assignment):
        hooks = [modules[l].register_forward_pre_hook(functools.partial(_record_first_input, first_inputs, l))
                 for l, (_, a) in assignment.items() if a is not None]
        try:
            metrics = evaluate(ctx.net, ctx.test_set, ctx.cfg["evaluation"]["batch_size"], ctx.device,
                               workers=ctx.cfg["models"][ctx.model_name]["dataset"]["workers"])
        finally:
            for h in hooks:
                h.remove()
        w_entropy, a_entropy = _entropy_bits(ctx, assignment, first_inputs)
    bits = ctx.table.weight_bits(assignment)
    total = sum(ctx.table.numel.values())
    metrics.update(
        size_mb=bits / 8 / 1e6,
        avg_bits=bits / total,
        weight_entropy_bits=w_entropy,
        act_entropy_bits=a_entropy,
        gbitops=ctx.table.bitops(assignment) / 1e9,
        assignment={l: list(o) for l, o in assignment.items()},
    )
    return metrics


def parse_option(name: str) -> tuple[int, int]:
    """(4, 8) for 'w4a8'."""
    w, a = name[1:].split("a")
    return int(w), int(a)


def evaluate_uniform(cfg: dict, model: str, checkpoint: str, calibration: str, option: str) -> dict:
    """Evaluate every candidate layer at one option (fixed layers at their bits), next to the FP metrics."""
    ctx = load_context(cfg, model, checkpoint, calibration)
    opt = parse_option(option)
    if opt not in ctx.table.options:
        raise ValueError(f"option {option!r} is not in the option table {ctx.table.options}")
    metrics = evaluate_assignment(ctx, ctx.uniform_assignment(opt))
    fp = torch.load(checkpoint, map_location="cpu", weights_only=False)["fp_metrics"]
    metrics.update(method="uniform", option=option, fp_top1=fp["top1"], fp_loss=fp["loss"])
    log.info("uniform %s: top1 %.4f (FP %.4f)", option, metrics["top1"], fp["top1"])
    return metrics
