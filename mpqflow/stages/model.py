"""Stage `model`: train (or load) the FP model, then calibrate every quantizer.

Usage (what workflow_scripts/train_model.py and calibrate.py call):
    train_or_load(model_cfg, seed, evaluation, runtime, "results/m/model.pt")
    calibrate(model_cfg, quant, seed, runtime, "results/m/model.pt", "results/m/calibration.pt",
              "results/m/layers.json", plan=plan)
"""

from __future__ import annotations

import logging

from ..artifacts import save_calibration, save_checkpoint, save_layer_table
from ..config import EvaluationConfig, ModelConfig, QuantConfig, Runtime, SamplePlanConfig
from ..context import calibrate_quantizer, data_spec, fresh_model, load_model, resolve_device
from ..data import load_split, pool_batch_indices
from ..io import file_sha256
from ..metrics import evaluate
from ..models import load_weights
from ..train import seed_everything, train_model

__all__ = ["train_or_load", "calibrate"]
log = logging.getLogger("mpqflow")


def train_or_load(model: ModelConfig, seed: int, evaluation: EvaluationConfig, runtime: Runtime, out_path: str) -> dict:
    """Train the FP model (or load its configured local weights), measure it, save the checkpoint."""
    device = resolve_device(runtime)
    spec = data_spec(model, seed)
    seed_everything(seed)  # the initial weights come from the global RNG: seed it first
    net = fresh_model(model, seed)
    if model.weights:
        load_weights(net, model.weights)
        log.info("loaded weights from %s", model.weights)
    else:
        log.info("training %s on %s: %s", model.arch, spec.name, model.train)
        train_model(net, load_split(spec, "train"), model.train, seed, device)
    metrics = evaluate(
        net.to(device), load_split(spec, "test"), evaluation.batch_size, device, workers=model.dataset.workers
    )
    log.info("FP test metrics: %s", metrics)
    save_checkpoint(out_path, net.cpu().state_dict(), model.arch, metrics)
    return metrics


def calibrate(
    model: ModelConfig,
    quant: QuantConfig,
    seed: int,
    runtime: Runtime,
    checkpoint: str,
    out_path: str,
    layers_path: str,
    plan: SamplePlanConfig | None = None,
) -> None:
    """Calibrate every quantizer (each layer, each bit-width) on the plan's calibration samples.

    Also the first job that knows the training split, so it checks that the sensitivity pool fits
    it (`plan`): a bad setting stops here, not in the middle of the sensitivity stage. (Budgets are
    checked against the layer table by the solve stage's `check_budgets`, right after this job.)
    """
    device = resolve_device(runtime)
    seed_everything(seed)
    train = load_split(data_spec(model, seed), "train")
    if plan is not None and plan.pool_batches:
        pool_batch_indices(len(train), plan, plan.pool_batches - 1)  # raises naming the keys
    net = load_model(model, checkpoint, device, seed)
    table, quantizer = calibrate_quantizer(net, train, quant, seed, device, model.dataset.workers)
    save_calibration(out_path, quantizer.state_dict(), table, file_sha256(checkpoint), quant.to_dict())
    save_layer_table(layers_path, table)
    log.info(
        "calibrated %d layers (%d candidates) on %d samples",
        len(table.layers),
        len(table.candidates),
        quant.calibration_samples,
    )
