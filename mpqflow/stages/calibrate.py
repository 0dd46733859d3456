"""Stage `calibrate`: calibrate every quantizer (each layer, each bit-width) of the FP model.

Usage (what workflow_scripts/calibrate.py calls):
    calibrate(model_cfg, quant, seed, runtime, "results/m/model.pt", "results/m/calibration.pt",
              "results/m/layers.json", plan=plan)
"""

from __future__ import annotations

import logging

from ..artifacts import save_calibration, save_layer_table
from ..config import ModelConfig, QuantConfig, Runtime, SamplePlanConfig
from ..context import calibrated_context
from ..data import data_spec, load_split, pool_batch_indices

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
    train = load_split(data_spec(model, seed), "train")
    if plan is not None and plan.pool_batches:
        pool_batch_indices(len(train), plan, plan.pool_batches - 1)  # raises naming the keys
    ctx = calibrated_context(model, quant, seed, runtime, checkpoint, train)
    save_calibration(out_path, ctx.quantizer.state_dict(), ctx.table, ctx.checkpoint_sha256, quant.to_dict())
    save_layer_table(layers_path, ctx.table, ctx.checkpoint_sha256)
    log.info(
        "calibrated %d layers (%d candidates) on %d samples",
        len(ctx.table.layers),
        len(ctx.table.candidates),
        quant.calibration_samples,
    )
