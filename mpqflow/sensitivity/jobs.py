"""The sensitivity stage's jobs: one estimator on one pool batch, and the pooling of batches into a set.

Usage (what the workflow scripts call):
    sensitivity_batch(cfg, "m", model_pt, calibration_pt, "clado", 3, "results/m/sensitivity/clado/batch_3.npz")
    pool_set([...batch files...], "results/m/sensitivity/clado/set_4x0.npz")
"""

from __future__ import annotations

import logging

import numpy as np

from ..data import SamplePlan, stack
from ..pipeline import load_context
from . import batch_meta, compute_batch, pool_batch_files, save_batch_file

__all__ = ["pool_batch_indices", "sensitivity_batch", "pool_set"]
log = logging.getLogger("mpqflow")


def pool_batch_indices(cfg: dict, n_train: int, batch: int) -> np.ndarray:
    """Training-split indices of pool batch `batch` (independent of the pool's size)."""
    s = cfg["sensitivity"]
    return SamplePlan(n_train, cfg["quant"]["calibration_samples"], batch + 1, s["batch_size"], cfg["seed"]).pool_batch(batch)


def sensitivity_batch(cfg, model, checkpoint, calibration, estimator, batch, out_path) -> None:
    """Run one estimator on one pool batch and write its additive per-batch file."""
    ctx = load_context(cfg, model, checkpoint, calibration)
    x, y = stack(ctx.train_set, pool_batch_indices(cfg, len(ctx.train_set), batch))
    log.info("%s on batch %d: %d samples, %d candidate layers x %d options",
             estimator, batch, len(y), len(ctx.table.candidates), len(ctx.table.options))
    payload = compute_batch(estimator, ctx, x.to(ctx.device), y.to(ctx.device), cfg["sensitivity"])
    save_batch_file(out_path, payload, batch_meta(ctx, estimator, cfg["sensitivity"]))


def pool_set(batch_paths: list[str], out_path: str) -> None:
    """Sum per-batch files into one set file (exact for any subset; refuses mismatched files)."""
    pooled = pool_batch_files(batch_paths)
    save_batch_file(out_path, pooled)
    log.info("pooled %d batch files into %s (%d samples)", len(batch_paths), out_path, int(pooled["count"]))
