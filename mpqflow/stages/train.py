"""Stage `train`: train (or load) the FP model and measure it on the held-out split.

Usage (what workflow_scripts/train_model.py calls):
    train_or_load(model_cfg, seed, evaluation, runtime, "results/m/model.pt", state_dir="results/m/.train_state")

Training runs on `models.<m>.train.world_size` processes (mpqflow.train.launch: in this process for
one, torchrun for several); rank 0 measures the trained model and writes the checkpoint. With a
`state_dir`, every epoch is checkpointed there and a rerun resumes from it; it is removed once the
checkpoint is written. No quantization code: editing the quantizers never retrains.
"""

from __future__ import annotations

import logging

from ..artifacts import fp_metrics, save_checkpoint
from ..codehash import code_hash
from ..config import EvaluationConfig, ModelConfig, Runtime
from ..data import data_spec, load_split
from ..metrics import evaluate
from ..models import fresh_model, load_weights
from ..runtime import resolve_device, seed_everything
from ..train import DistEnv, clear_state, fit, launch

__all__ = ["train_or_load", "train_job"]
log = logging.getLogger("mpqflow")


def train_or_load(
    model: ModelConfig,
    seed: int,
    evaluation: EvaluationConfig,
    runtime: Runtime,
    out_path: str,
    state_dir: str | None = None,
) -> dict:
    """Train the FP model (or load its configured local weights), measure it, save the checkpoint.

    Args:
        runtime: device and threads of the whole job (each of N ranks gets threads // N).
        state_dir: epoch checkpoints of the training (outside the rule's outputs); None = none.
    Returns the held-out metrics.
    """
    if model.weights:
        return _load_and_measure(model, seed, evaluation, runtime, out_path)
    log.info("training %s on %s: %s", model.arch, model.dataset.name, model.train)
    kwargs = {
        "model": model,
        "seed": seed,
        "evaluation": evaluation,
        "out_path": out_path,
        "state_dir": state_dir,
    }
    target = f"{__name__}:{train_job.__name__}"
    w = model.train.world_size
    launch(target, kwargs, w, threads=runtime.threads, timeout_s=runtime.collective_timeout_s, device=runtime.device)
    return fp_metrics(out_path)


def train_job(
    model: ModelConfig, seed: int, evaluation: EvaluationConfig, out_path: str, state_dir: str | None, env: DistEnv
) -> None:
    """One rank of the training (the launch target): fit, then rank 0 measures and saves the model."""
    cfg, ev = model, evaluation
    spec = data_spec(cfg, seed)
    seed_everything(seed)  # the initial weights come from the global RNG: seed it first
    net = fresh_model(cfg, seed)
    tag = code_hash(__name__)  # an epoch checkpoint of other training code is not resumed
    fit(net, load_split(spec, "train"), cfg.train, seed=seed, env=env, state_dir=state_dir, tag=tag)
    if env.is_main:
        test = load_split(spec, "test")
        metrics = evaluate(net.to(env.device), test, ev.batch_size, env.device, workers=cfg.dataset.workers)
        log.info("FP test metrics: %s", metrics)
        save_checkpoint(out_path, net.cpu().state_dict(), cfg.arch, metrics)
        clear_state(state_dir)  # the output exists: nothing left to resume


def _load_and_measure(model: ModelConfig, seed: int, evaluation: EvaluationConfig, runtime: Runtime, out_path: str):
    device = resolve_device(runtime)
    spec = data_spec(model, seed)
    seed_everything(seed)
    net = fresh_model(model, seed)
    load_weights(net, model.weights)
    log.info("loaded weights from %s", model.weights)
    metrics = evaluate(
        net.to(device), load_split(spec, "test"), evaluation.batch_size, device, workers=model.dataset.workers
    )
    log.info("FP test metrics: %s", metrics)
    save_checkpoint(out_path, net.cpu().state_dict(), model.arch, metrics)
    return metrics
