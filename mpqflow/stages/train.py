"""Stage `train`: train (or load) the FP model and measure it on the held-out split.

Usage (what workflow_scripts/train_model.py calls):
    train_or_load(model_cfg, seed, evaluation, runtime, "results/m/model.pt")

No quantization code: editing the quantizers never retrains.
"""

from __future__ import annotations

import logging

from ..artifacts import save_checkpoint
from ..config import EvaluationConfig, ModelConfig, Runtime
from ..data import data_spec, load_split
from ..metrics import evaluate
from ..models import fresh_model, load_weights
from ..runtime import resolve_device, seed_everything
from ..train import train_model

__all__ = ["train_or_load"]
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
