"""Stage `gradquant`: one run of the gradient-quantization study (its report: stage `gradquant_report`).

Usage (workflow_scripts/gradquant_run.py):
    spec = GradQuantStudyConfig.from_dict(cfg["gradquant"]).run_spec("alq-3bit")   # processes, epochs, exchange
    run_gradquant(model_cfg, spec, "alq-3bit", seed=0, evaluation=evaluation_cfg, runtime=Runtime("cpu", 2, 600.0),
                  out_path="results/m/gradquant/alq-3bit.json", state_dir="results/m/.gradquant_state/alq-3bit")

A run trains the model from scratch (its arch, data and train settings; the study's epochs) on
`gradquant.world_size` processes (torchrun, gloo on the CPU), exchanging gradients with the run's
method: `none` is DDP's float32 all-reduce, the others the quantized all-gather of
:mod:`mpqflow.comm` at the run's bits. Both hooks measure the bytes they write to the wire, so the
comparison with full precision is measured on both sides. The run's JSON holds the held-out top-1 and
loss, the training loss per epoch, the normalised variance E||Q(g) - g||^2 / ||g||^2 per step
(averaged over the ranks), the levels, and the bytes per step; every rank starts from the same
seeded weights and data order, so the runs differ only in the exchange. Epoch checkpoints make a
killed run resume where it stopped.
"""

from __future__ import annotations

import logging
import time

import torch.distributed as dist

from ..codehash import code_hash
from ..comm import ExchangeState, GradQuantState, float_allreduce_hook, quantized_allgather_hook
from ..config import EvaluationConfig, ModelConfig, Runtime, TrainSettings
from ..data import data_spec, load_split
from ..io import save_json
from ..metrics import evaluate
from ..models import fresh_model
from ..runtime import seed_everything
from ..train import DistEnv, clear_state, fit, launch

__all__ = ["run_gradquant", "gradquant_job", "run_settings"]
log = logging.getLogger("mpqflow")


def run_settings(model: ModelConfig, spec: dict) -> TrainSettings:
    """The model's train settings with a run's processes, epochs and exchange (GradQuantStudyConfig.run_spec)."""
    base = model.train.to_dict() | {"world_size": spec["world_size"], "grad_quant": spec["grad_quant"]}
    if spec["epochs"] is not None:
        base["epochs"] = spec["epochs"]
    return TrainSettings.from_dict(base)


def run_gradquant(
    model: ModelConfig,
    spec: dict,
    run: str,
    *,
    seed: int,
    evaluation: EvaluationConfig,
    runtime: Runtime,
    out_path: str,
    state_dir=None,
) -> None:
    """Train one run of the study (`spec`: GradQuantStudyConfig.run_spec(run)) on spec["world_size"]
    processes; rank 0 writes `out_path`."""
    world = spec["world_size"]
    log.info("gradquant run %s: %d processes", run, world)
    kwargs = dict(model=model, spec=spec, run=run, seed=seed, evaluation=evaluation, out_path=out_path,
                  state_dir=state_dir)  # fmt: skip
    target = f"{__name__}:{gradquant_job.__name__}"
    launch(
        target, kwargs, world, threads=runtime.threads, timeout_s=runtime.collective_timeout_s, device=runtime.device
    )


def _exchange(settings: TrainSettings, seed: int, env: DistEnv) -> tuple:
    """(state, hook) of the run's gradient exchange, both measuring the bytes they write."""
    if settings.grad_quant is None:
        return ExchangeState(rank=env.rank, world_size=env.world_size), float_allreduce_hook
    state = GradQuantState(**settings.grad_quant, seed=seed, rank=env.rank, world_size=env.world_size,
                           device=env.device)  # fmt: skip
    return state, quantized_allgather_hook


def _per_rank(state: ExchangeState, env: DistEnv) -> list[dict]:
    """Every rank's counters and variance history (a collective)."""
    mine = {k: state.state_dict()[k] for k in ("step", "bytes_sent", "bytes_full_precision", "wire_bytes")}
    mine["variance"] = list(getattr(state, "variance", []))
    every: list = [None] * env.world_size
    dist.all_gather_object(every, mine)
    return every


def _record(run: str, settings: TrainSettings, state: ExchangeState, ranks: list[dict], history, test, seconds):
    steps = ranks[0]["step"]
    wire = [r["wire_bytes"] for r in ranks]
    variance = [  # (step, mean over ranks of the normalised variance)
        [s, sum(r["variance"][i][1] for r in ranks) / len(ranks)] for i, (s, _) in enumerate(ranks[0]["variance"])
    ]
    gq = settings.grad_quant or {}
    return {
        "run": run,
        "method": gq.get("method", "none"),
        "bits": gq.get("bits", 32),
        "world_size": settings.world_size,
        "epochs": settings.epochs,
        "steps": steps,
        "settings": settings.to_dict(),
        "top1": test["top1"],
        "test_loss": test["loss"],
        "train_history": history,
        "variance": variance,
        "levels": [float(v) for v in getattr(state, "levels", [])],
        "level_refits": getattr(state, "updates", 0),
        # per process and step, averaged over the ranks
        "bytes_sent_per_step": sum(r["bytes_sent"] for r in ranks) / len(ranks) / steps,
        "bytes_fp32_per_step": sum(r["bytes_full_precision"] for r in ranks) / len(ranks) / steps,
        "wire_bytes_per_step": None if None in wire else sum(wire) / len(wire) / steps,
        "seconds": seconds,
    }


def gradquant_job(
    model: ModelConfig,
    spec: dict,
    run: str,
    seed: int,
    evaluation: EvaluationConfig,
    out_path: str,
    state_dir,
    env: DistEnv,
) -> None:
    """One rank of a study run (the launch target): fit with the run's exchange, rank 0 measures and writes."""
    cfg = model
    settings = run_settings(cfg, spec)
    spec = data_spec(cfg, seed)
    seed_everything(seed)  # the initial weights come from the global RNG: every run starts alike
    net = fresh_model(cfg, seed)
    state, hook = _exchange(settings, seed, env)
    history: list = []
    t0 = time.perf_counter()
    fit(net, load_split(spec, "train"), settings, seed=seed, env=env, state_dir=state_dir, desc=f"gradquant {run}",
        tag=code_hash(__name__), comm_hook=(state, hook), history=history)  # fmt: skip
    seconds = time.perf_counter() - t0
    ranks = _per_rank(state, env)
    if env.is_main:
        test = evaluate(net.to(env.device), load_split(spec, "test"), evaluation.batch_size,
                        env.device, workers=cfg.dataset.workers)  # fmt: skip
        record = _record(run, settings, state, ranks, history, test, seconds)
        log.info("gradquant %s: top-1 %.4f, %s", run, test["top1"], state.summary())
        save_json(out_path, record)
        clear_state(state_dir)  # the output exists: nothing left to resume
