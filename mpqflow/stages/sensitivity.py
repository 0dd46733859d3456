"""Stage `sensitivity`: one estimator on one pool batch, and the pooling of batches into a set.

Usage (what workflow_scripts/sensitivity_batch.py and pool_set.py call):
    sensitivity_batch(model_cfg, quant, plan, settings, runtime, model_pt, calibration_pt, "clado", 3,
                      "results/m/sensitivity/clado/batch_3.npz")
    pool_set([...batch files...], "results/m/sensitivity/clado/set_4x0.npz", 4, 0)   # set 4x0 records 4, 0
"""

from __future__ import annotations

import logging

from ..artifacts import pool_batch_files, save_batch_file
from ..config import ModelConfig, QuantConfig, Runtime, SamplePlanConfig

__all__ = ["sensitivity_batch", "pool_set"]
log = logging.getLogger("mpqflow")


def sensitivity_batch(
    model: ModelConfig,
    quant: QuantConfig,
    plan: SamplePlanConfig,
    settings: dict,
    runtime: Runtime,
    checkpoint: str,
    calibration: str,
    estimator: str,
    batch: int,
    out_path: str,
) -> None:
    """Run one estimator on one pool batch and write its additive per-batch file.

    Args:
        settings: the estimator's settings (:meth:`mpqflow.config.SensitivityConfig.of_estimator`).
    """
    from ..context import load_context  # torch: imported here so pooling (no torch) starts fast
    from ..data import pool_batch_indices, stack
    from ..sensitivity import batch_meta, compute_batch
    from ..sensitivity.common import refuse_nonfinite

    ctx = load_context(model, quant, plan.seed, runtime, checkpoint, calibration)
    x, y = stack(ctx.train_set, pool_batch_indices(len(ctx.train_set), plan, batch))
    log.info(
        "%s on batch %d: %d samples, %d candidate layers x %d options",
        estimator,
        batch,
        len(y),
        len(ctx.table.candidates),
        len(ctx.table.options),
    )
    payload = compute_batch(estimator, ctx, x.to(ctx.device), y.to(ctx.device), settings)
    refuse_nonfinite(payload, ctx.table.candidates, len(ctx.table.options), f"{estimator} on pool batch {batch}")
    save_batch_file(out_path, payload, batch_meta(ctx, estimator, settings))


def pool_set(batch_paths: list[str], out_path: str, set_size: int, set_id: int) -> None:
    """Sum per-batch files into the file of set `set_size`x`set_id`, which records that identity (exact
    for any subset; refuses mismatched files)."""
    pooled = pool_batch_files(batch_paths)
    save_batch_file(out_path, {**pooled, "set_size": set_size, "set_id": set_id})
    log.info("pooled %d batch files into %s (%d samples)", len(batch_paths), out_path, int(pooled["count"]))
