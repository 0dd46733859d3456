"""A loaded model with its data, layer table and calibrated quantizer: what the torch stages share.

Usage:
    net = load_model(model_cfg, "results/m/model.pt", device)
    net, folded = quantization_model(model_cfg, quant, "results/m/model.pt", device)  # BNs folded per quant.fold_bn
    table, quantizer = calibrate_quantizer(net, train_set, quant, seed, device, workers=0)
    ctx = load_context(model_cfg, quant, seed, runtime, "results/m/model.pt", "results/m/calibration.pt")
    with ctx.quantizer.applied(ctx.table.uniform_assignment((4, 8))):
        logits = ctx.net(x)

A Context is built once per job and not changed afterwards (frozen); its data splits load on
first use. Every quantization stage gets its model from :func:`quantization_model`, the one place
where ``quant.fold_bn`` folds the BatchNorms (:mod:`mpqflow.quant.fold`): calibration, sensitivity,
evaluation, PTQ, LIMPQ and fine-tuning then all see the same folded convs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import torch

from .artifacts import load_calibration, load_checkpoint
from .config import ModelConfig, QuantConfig, Runtime
from .data import DataSpec, SamplePlan, data_spec, iterate, load_split, stack
from .io import file_sha256
from .layers import LayerTable
from .models import fresh_model, layer_macs, quantizable_layers, unreached_layers, unreached_numel
from .quant import ModelQuantizer, QuantScheme, fold_batchnorm
from .runtime import resolve_device, seed_everything

__all__ = [
    "load_model",
    "quantization_model",
    "layer_table",
    "build_quantizer",
    "calibrate_quantizer",
    "Context",
    "calibrated_context",
    "load_context",
]
log = logging.getLogger("mpqflow")


def load_model(model: ModelConfig, checkpoint: str, device, seed: int = 0) -> torch.nn.Module:
    """Rebuild a configured model and load its FP checkpoint (eval mode, on `device`)."""
    net = fresh_model(model, seed)
    net.load_state_dict(load_checkpoint(checkpoint)["state_dict"])
    return net.to(device).eval()


def quantization_model(
    model: ModelConfig, quant: QuantConfig, checkpoint: str, device, seed: int = 0
) -> tuple[torch.nn.Module, dict[str, str]]:
    """(the FP model as quantization sees it, {conv: bn} folded): :func:`load_model`, then, with
    ``quant.fold_bn``, every foldable BatchNorm2d folded into its conv (eval mode, running statistics)."""
    net = load_model(model, checkpoint, device, seed)
    folded = fold_batchnorm(net) if quant.fold_bn else {}
    return net, folded


def layer_table(
    net: torch.nn.Module, example: torch.Tensor, quant: QuantConfig, folded_bn: dict | None = None
) -> LayerTable:
    """Quantizable layers of `net` (traced on `example`), with first/last fixed per `quant`;
    `folded_bn` ({conv: bn}) records what :func:`quantization_model` folded."""
    layers = tuple(quantizable_layers(net, example[:1]))
    unreached = tuple(unreached_layers(net, list(layers)))
    if unreached:
        log.warning(
            "%d weight layer(s) are used through functional calls the quantizer cannot reach and stay FP: %s",
            len(unreached),
            ", ".join(unreached),
        )
    fixed_names = (layers[0], layers[-1]) if quant.fix_first_last and len(layers) > 2 else ()
    modules = dict(net.named_modules())
    return LayerTable(
        layers=layers,
        candidates=tuple(l for l in layers if l not in fixed_names),
        fixed={l: (quant.fixed_bits, quant.fixed_bits) for l in fixed_names},
        options=tuple(quant.options),
        numel={**{l: int(modules[l].weight.numel()) for l in layers}, **unreached_numel(net, list(unreached))},
        macs={l: int(v) for l, v in layer_macs(net, example[:1]).items()},
        unreached=unreached,
        fold_bn=bool(quant.fold_bn),
        folded_bn=dict(folded_bn or {}),
    )


def build_quantizer(net: torch.nn.Module, table: LayerTable, quant: QuantConfig) -> ModelQuantizer:
    """An uncalibrated quantizer of every table layer at every bit-width the table uses."""
    w_bits = sorted({w for w, _ in table.options} | {w for w, _ in table.fixed.values()})
    a_bits = sorted({a for _, a in table.options} | {a for _, a in table.fixed.values()})
    return ModelQuantizer(
        net,
        list(table.layers),
        QuantScheme.from_dict(quant.weight),
        QuantScheme.from_dict(quant.activation),
        w_bits,
        a_bits,
    )


def calibrate_quantizer(
    net, train_set, quant: QuantConfig, seed: int, device, workers: int = 0, folded_bn: dict | None = None
):
    """(layer table, calibrated quantizer) from the sample plan's calibration samples (`folded_bn`:
    what was folded into `net`, recorded in the table).

    The calibration samples do not depend on the sensitivity pool, so growing the pool keeps them.
    """
    plan = SamplePlan(len(train_set), quant.calibration_samples, 0, 1, seed)
    example, _ = stack(train_set, plan.calibration()[:2])
    table = layer_table(net, example.to(device), quant, folded_bn)
    quantizer = build_quantizer(net, table, quant)
    batches = (x.to(device) for x, _ in iterate(train_set, quant.calibration_batch_size, plan.calibration(), workers))
    quantizer.calibrate(batches)
    return table, quantizer


@dataclass(frozen=True)
class Context:
    """A loaded model with its calibrated quantizer, layer table and data.

    Args:
        net: the FP model (eval mode, on `device`); the quantizer's assignment decides what is quantized.
        quantizer: the calibrated ModelQuantizer of `net`.
        table: the layer table.
        quant: the quant section the quantizer was built from.
        checkpoint_sha256: hash of the FP checkpoint (recorded in every artifact made from it).
        device: where `net` lives.
        spec: the model's data; `workers`: DataLoader workers for folder datasets.
    """

    net: torch.nn.Module
    quantizer: ModelQuantizer
    table: LayerTable
    quant: QuantConfig
    checkpoint_sha256: str
    device: torch.device
    spec: DataSpec | None = None
    workers: int = 0

    @cached_property
    def train_set(self):
        return load_split(self.spec, "train")

    @cached_property
    def test_set(self):
        return load_split(self.spec, "test")

    @cached_property
    def weight_entropy(self) -> dict:
        """{(layer, w_bits): bits/element} of quantized weights already measured (they are fixed for a
        Context, and one job evaluates many assignments that share most of them)."""
        return {}


def load_context(
    model: ModelConfig, quant: QuantConfig, seed: int, runtime: Runtime, checkpoint: str, calibration: str
) -> Context:
    """Load model + calibrated quantizer; refuse a calibration made from another checkpoint or quant
    section (fold_bn included), or whose folded BatchNorms are not the ones this model folds."""
    device = resolve_device(runtime)
    sha = file_sha256(checkpoint)
    state, table = load_calibration(calibration, sha, quant.to_dict())
    net, folded = quantization_model(model, quant, checkpoint, device, seed)
    if folded != table.folded_bn:
        raise ValueError(
            f"{calibration} was calibrated with BatchNorms {table.folded_bn} folded, but this model folds "
            f"{folded} (quant.fold_bn: {quant.fold_bn}); the model code changed since: rerun calibrate"
        )
    quantizer = build_quantizer(net, table, quant)
    quantizer.load_state_dict(state)
    return Context(net, quantizer, table, quant, sha, device, data_spec(model, seed), model.dataset.workers)


def calibrated_context(
    model: ModelConfig, quant: QuantConfig, seed: int, runtime: Runtime, checkpoint: str, train_set=None
) -> Context:
    """Load the FP model (seeded) and calibrate a fresh quantizer on the calibration samples of
    `train_set` (default: the model's training split): what calibration and each PTQ variant run."""
    device = resolve_device(runtime)
    seed_everything(seed)
    spec = data_spec(model, seed)
    train_set = load_split(spec, "train") if train_set is None else train_set
    net, folded = quantization_model(model, quant, checkpoint, device, seed)
    table, quantizer = calibrate_quantizer(net, train_set, quant, seed, device, model.dataset.workers, folded)
    return Context(net, quantizer, table, quant, file_sha256(checkpoint), device, spec, model.dataset.workers)
