"""Stage `calibrate`: calibrate every quantizer (each layer, each bit-width) of the FP model.

Usage (what workflow_scripts/calibrate.py calls):
    calibrate(model_cfg, quant, seed, runtime, "results/m/model.pt", "results/m/calibration.pt",
              "results/m/layers.json", plan=plan)
"""

from __future__ import annotations

import logging

from ..artifacts import save_calibration, save_layer_table
from ..config import ModelConfig, QuantConfig, Runtime, SamplePlanConfig
from ..context import calibrate_quantizer, load_model
from ..data import data_spec, load_split, pool_batch_indices
from ..io import file_sha256
from ..runtime import resolve_device, seed_everything

__all__ = ["calibrate"]
log = logging.getLogger("mpqflow")


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
    """Calibrate on the plan's calibration samples; write the calibration and the layer table.

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
