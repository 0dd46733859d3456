"""Sensitivity estimators: one additive per-batch payload per (model, estimator, batch).

Usage:
    from mpqflow.sensitivity import compute_batch, batch_meta, save_batch_file, pool_batch_files
    payload = compute_batch("clado", ctx, x, y, cfg["sensitivity"])   # sums over samples + count
    save_batch_file(path, payload, batch_meta(ctx, "clado", cfg["sensitivity"]))
    pooled = pool_batch_files(paths)          # exact for any subset of batches, order-independent
    G = mpqflow.methods.clado_matrix(pooled, "ce")   # objectives live in methods.py: editing them
                                                     # re-solves, it never recomputes a sensitivity

Estimators (payload keys; n = L*K options, option i = l*K + k):
    clado  ce_base_sum (), ce_single_sum (n,), ce_pair_sum (n, n), kl_single_sum (n,), kl_pair_sum (n, n),
           ce_gsq_sum (n, n), kl_gsq_sum (n, n), ce_dsq_sum (n, n), kl_dsq_sum (n, n)
    mpqco  sq_sum (n,), sq_squared_sum (n,)
    hawq   trace_sum (L,), trace_var_sum (L,), probes_sum (L,), weight_err (n,) (per-file constant)
and `count` (samples) in every payload. Modules: :mod:`.common` (indexing, file format, pooling),
:mod:`.clado` + :mod:`.fx_engine` (pairwise passes), :mod:`.mpqco`, :mod:`.hawq`.
"""

from __future__ import annotations

import logging
import time

import torch

from .clado import clado_batch
from .common import (
    META_FIELDS,
    OptionIndex,
    batch_meta,
    load_batch_file,
    means,
    pool_batch_files,
    save_batch_file,
    split_meta,
)
from .hawq import hawq_batch
from .mpqco import mpqco_batch

__all__ = [
    "ESTIMATORS",
    "compute_batch",
    "OptionIndex",
    "META_FIELDS",
    "batch_meta",
    "save_batch_file",
    "load_batch_file",
    "pool_batch_files",
    "split_meta",
    "means",
]

log = logging.getLogger("mpqflow")
ESTIMATORS = {"clado": clado_batch, "mpqco": mpqco_batch, "hawq": hawq_batch}


def compute_batch(estimator: str, ctx, x: torch.Tensor, y: torch.Tensor, settings: dict | None = None) -> dict:
    """Per-batch payload of `estimator` on (x, y): sums over the batch's samples plus `count`.

    Args:
        estimator: one of ESTIMATORS (clado, mpqco, hawq).
        ctx: context.Context (net, calibrated quantizer, layer table, device).
        x: (B, ...) inputs, y: (B,) labels (moved to ctx.device here).
        settings: the config's `sensitivity` section (extra keys are ignored).

    The quantizer's applied assignment is the same before and after.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {sorted(ESTIMATORS)}")
    x, y = x.to(ctx.device), y.to(ctx.device)
    t0 = time.perf_counter()
    payload = ESTIMATORS[estimator](ctx, x, y, settings or {})
    log.info("%s on %d samples: %.2f s", estimator, x.shape[0], time.perf_counter() - t0)
    return payload
