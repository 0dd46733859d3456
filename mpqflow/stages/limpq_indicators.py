"""Stage `limpq_indicators`: LIMPQ's importance indicators of one sensitivity set, pretrained or imported.

Usage (workflow_scripts/limpq_indicators.py; `job` holds limpq_indicators()'s arguments but `env`: typed
config sections and JSON-ready values, which the launcher hands to torchrun's workers too):
    run_limpq_indicators(dict(model=model_cfg, quant=quant_cfg, seed=0, plan=sample_plan,
                              settings=limpq_cfg, checkpoint="results/m/model.pt",
                              calibration="results/m/calibration.pt", set_size=4, set_id=0,
                              batches=[1, 3, 5, 6],          # the set's pool batches; None: data train
                              out_path="results/m/sensitivity/limpq/set_4x0.npz",
                              state_dir="results/m/.limpq_state/set_4x0"),
                         Runtime("cpu", threads=2, collective_timeout_s=600.0))

With `settings.indicators` (a LIMPQ-format pickle) the file is imported onto the layer table and no
training runs: every set then holds the same indicators. Otherwise `settings.world_size` ranks
(:func:`mpqflow.train.launch`) pretrain the switchable LSQ model of
:mod:`mpqflow.sensitivity.limpq` on the set's data and rank 0 writes the learned step sizes.

What a set means for a trained estimator: set NxS's indicators come from a run seeded by
(seed, N, S) on the set's N pool batches (`data: set`, the samples CLADO, MPQCO and HAWQ measure on
for the same set), or on the whole training split (`data: train`: then N and S only vary the seed).
The variance study across sets is therefore the indicator training's variance over data subsets and
seeds, not a sampling error of a sum over batches.
"""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import torch
from torch.utils.data import Subset

from ..artifacts import load_calibration, save_batch_file
from ..codehash import code_hash
from ..config import LimpqConfig, ModelConfig, QuantConfig, Runtime, SamplePlanConfig
from ..context import load_context
from ..data import pool_batch_indices
from ..indicators import MASK_PREFIX, read_limpq_pickle
from ..io import file_sha256
from ..sensitivity.common import refuse_nonfinite, sensitivity_meta
from ..sensitivity.limpq import ESTIMATOR, indicator_payload, limpq_supernet, train_indicators
from ..train import launch
from ..train.state import clear_state

__all__ = ["run_limpq_indicators", "limpq_indicators", "limpq_run_seed", "limpq_meta"]
log = logging.getLogger("mpqflow")


def limpq_run_seed(seed: int, set_size: int, set_id: int) -> int:
    """The indicator run's seed of set NxS: distinct for every (seed, N, S) of a study."""
    return int(seed) * 1_000_003 + int(set_size) * 1_009 + int(set_id)


def limpq_meta(table, quant: QuantConfig, checkpoint_sha256: str, settings: LimpqConfig) -> dict:
    """The meta fields of a limpq indicator file (the sensitivity-file contract, its limpq settings)."""
    return sensitivity_meta(table, quant.to_dict(), checkpoint_sha256, ESTIMATOR, settings.to_dict())


def run_limpq_indicators(job: dict, runtime: Runtime) -> None:
    """Import the configured indicator file, or pretrain on `settings.world_size` processes sharing
    `runtime.threads`; writes `job["out_path"]`."""
    settings: LimpqConfig = job["settings"]
    if settings.indicators is not None:
        import_indicators(job, settings)
        return
    job = {"tag": code_hash(__name__), **job}  # an epoch checkpoint of other indicator code is not resumed
    launch(f"{__name__}:limpq_indicators", job, settings.world_size, threads=runtime.threads,
           timeout_s=runtime.collective_timeout_s, device=runtime.device)  # fmt: skip


def import_indicators(job: dict, settings: LimpqConfig) -> None:
    """A LIMPQ-format pickle mapped onto the calibration's layer table, as this set's indicator file."""
    sha = file_sha256(job["checkpoint"])
    quant = job["quant"]
    _, table = load_calibration(job["calibration"], sha, quant.to_dict())  # refuses another model's calibration
    try:
        payload = read_limpq_pickle(settings.indicators, table)
    except ValueError as err:  # checked before any job where the layer table traces on meta tensors
        raise ValueError(f"config key 'limpq.indicators' ({settings.indicators!r}): {err}") from None
    identity = {"set_size": job["set_size"], "set_id": job["set_id"]}
    save_batch_file(job["out_path"], {**payload, **identity}, limpq_meta(table, quant, sha, settings))
    log.info("imported LIMPQ indicators of %d layers from %s", len(table.candidates), settings.indicators)


def limpq_indicators(
    *,
    model: ModelConfig,
    quant: QuantConfig,
    seed: int,
    plan: SamplePlanConfig,
    settings: LimpqConfig,
    checkpoint: str,
    calibration: str,
    set_size: int,
    set_id: int,
    batches: list[int] | None,
    out_path: str,
    state_dir: str | None,
    tag: str = "",
    env,
) -> None:
    """Pretrain the indicators of set `set_size`x`set_id` on this rank; rank 0 writes `out_path`.

    Args:
        plan: which training samples a pool batch holds.
        batches: the pool batches to train on (the set's, `data: set`), None for the whole training
            split (`data: train`).
        settings: the indicator training's settings (the validated `limpq` section without the search's alpha).
        state_dir: the epoch checkpoints (resume after a kill); removed once the file exists.
        tag: what else identifies the run for resuming (the stage's code hash).
    """
    t0 = time.perf_counter()
    lp, model_cfg, quant_cfg, sample_plan = settings, model, quant, plan
    runtime = Runtime(str(env.device), torch.get_num_threads(), env.timeout_s)
    ctx = load_context(model_cfg, quant_cfg, seed, runtime, checkpoint, calibration)
    data = ctx.train_set
    if batches is not None:
        indices = np.concatenate([pool_batch_indices(len(data), sample_plan, b) for b in batches])
        data = Subset(data, indices.tolist())
    run_seed = limpq_run_seed(seed, set_size, set_id)
    net = limpq_supernet(ctx.net, ctx.table, ctx.quantizer, seed=run_seed)
    if env.is_main:
        log.info(
            "LIMPQ indicators of set %dx%d: %d samples, %d candidate layers, %d bit modes, on %d process(es)",
            set_size, set_id, len(data), len(ctx.table.candidates), net.modes, env.world_size,
        )  # fmt: skip
    train = lp.train_settings()
    candidates = list(ctx.table.candidates)
    run = dict(seed=run_seed, env=env, tag=f"{tag} set {set_size}x{set_id}", state_dir=state_dir)
    masks = train_indicators(net, data, train, lp.prune, candidates, **run)
    if not env.is_main:
        return
    payload = indicator_payload(net, ctx.table, samples=len(data))
    what = f"limpq indicators of set {set_size}x{set_id}"
    refuse_nonfinite(payload, ctx.table.candidates, len(ctx.table.options), what)  # a diverged run
    payload.update({MASK_PREFIX + layer: mask for layer, mask in masks.items()})
    payload.update(set_size=set_size, set_id=set_id)
    save_batch_file(out_path, payload, limpq_meta(ctx.table, quant, ctx.checkpoint_sha256, lp))
    log.info("LIMPQ indicators of set %dx%d in %.0f s", set_size, set_id, time.perf_counter() - t0)
    if lp.prune is None:
        clear_state(state_dir)
    elif state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
