"""The training loop: data-parallel SGD over the project's deterministic data, resumable per epoch.

Usage:
    env = init_distributed("cpu")                     # a world of one, or one rank under torchrun
    model = fit(model, train_set, settings, seed=0, env=env, state_dir="results/m/.train_state")
    # fine-tuning: a distillation loss and step sizes without weight decay
    fit(qmodel, train_set, settings, seed=0, env=env, loss_fn=kd_loss, desc="finetune",
        param_groups=[{"params": weights}, {"params": steps, "weight_decay": 0.0}])

Sampling (the DistributedSampler of this project): every rank draws the same seeded permutation of
the training split per epoch from one shared generator, cuts it into global batches of
`settings.batch_size` and takes its contiguous share of each: a batch of n samples gives ranks
0..W-1 floor(n/W) samples each, and the first n mod W ranks one more, so an uneven last batch is
used whole (nothing dropped, nothing padded). Each rank's mean loss is weighted by
W * n_rank / n before DDP averages the gradients, so the gradient of a step is the mean over the
global batch, whatever W. Only a last batch with fewer samples than ranks is skipped (every rank
skips it; the learning-rate schedule counts the steps that run). The random shift of a batch is drawn
from the shared generator, so all ranks shift alike. A world of one consumes the generator exactly as
the single-process trainer did, so its results are bit for bit those of that trainer.

BatchNorm statistics are per rank (no SyncBatchNorm), as in plain DDP: with BatchNorm, a run with W
ranks is a different (equally valid) run than with one. Same settings, seed and W give the same
result bit for bit, also when resumed from an epoch checkpoint (see :mod:`mpqflow.train.state`).

Progress: rank 0 logs one line per epoch and shows a step bar within each epoch (tqdm to stderr, the
rule's log in a job; redrawn every PROGRESS_INTERVAL_LOG_S into a log, so a long epoch is visible
without flooding it). The bar reads only the clock and the loss already computed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..comm import ExchangeState, GradQuantState, quantized_allgather_hook
from ..data import stack
from ..runtime import seed_everything
from .distributed import DistEnv, all_reduce_sum
from .state import fingerprint, load_state, save_state

__all__ = ["fit", "cross_entropy_loss", "shard_bounds", "steps_per_epoch", "step_sizes_without_decay"]
log = logging.getLogger("mpqflow")

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The default loss: (mean cross-entropy over the batch, logits (B, classes))."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def step_sizes_without_decay(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    """fit's param_groups for a model with LSQ quantizers: weights with weight decay, the step sizes
    (parameters named *.step) without (decay would pull every step to zero)."""
    steps = [p for n, p in net.named_parameters() if n.endswith(".step")]
    others = [p for n, p in net.named_parameters() if not n.endswith(".step")]
    return [{"params": others, "weight_decay": weight_decay}, {"params": steps, "weight_decay": 0.0}]


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of a batch of n: the first n % W ranks get one more."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def steps_per_epoch(samples: int, batch_size: int, world_size: int) -> int:
    """Global batches per epoch that run: all full ones, and the last one if every rank gets a sample."""
    full, rest = divmod(samples, batch_size)
    return full + (1 if rest >= world_size else 0)


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to max_shift pixels with zero padding (one draw per batch)."""
    if max_shift == 0:
        return x
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    padded = F.pad(x, (max_shift,) * 4)  # (B, C, H+2s, W+2s)
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def _wrap(model: torch.nn.Module, env: DistEnv, comm_hook=None) -> torch.nn.Module:
    """DistributedDataParallel around `model` when there are several ranks (it syncs the initial
    weights), with `comm_hook` = (state, hook) registered on it."""
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    # DDP re-orders its buckets after the first step (by when gradients become ready), except with
    # find_unused_parameters. A float all-reduce does not care; a bucketed quantizer does (which
    # coordinates share a norm), and a resumed run's first step would see the initial order where the
    # uninterrupted run saw the re-ordered one. So a layout-dependent exchange keeps the initial order.
    keep_layout = comm_hook is not None and getattr(comm_hook[0], "layout_dependent", False)
    ddp = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=keep_layout)
    if comm_hook is not None:
        ddp.register_comm_hook(*comm_hook)
    return ddp


def _resume(state_dir, fp: str, env: DistEnv, model, opt, sched, gen: torch.Generator, epochs: int, exchange) -> int:
    """Load a matching epoch checkpoint into the run; the number of epochs already done (0 if none)."""
    state = load_state(state_dir, fp, verbose=env.is_main)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        _set_rng_state(state["torch_rng"][env.rank], env, exchange)
        start = int(state["epoch"])
        if env.is_main:
            log.info("resumed from %s/epoch.pt: %d of %d epochs done", state_dir, start, epochs)
    if env.distributed:  # every rank must have read the same checkpoint
        lo_hi = torch.tensor([start, -start], dtype=torch.int64, device=env.device)
        dist.all_reduce(lo_hi, op=dist.ReduceOp.MAX)
        if int(lo_hi[0]) != -int(lo_hi[1]):
            raise RuntimeError(f"ranks disagree on the epoch to resume from ({-int(lo_hi[1])}..{int(lo_hi[0])})")
    return start


def _optimizer(model, settings, param_groups):
    params = model.parameters() if param_groups is None else param_groups
    return torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay, nesterov=True
    )


def fit(
    model: torch.nn.Module,
    train_set,
    settings,
    *,
    seed: int,
    env: DistEnv,
    loss_fn: LossFn | None = None,
    state_dir=None,
    desc: str = "train",
    param_groups: list[dict] | None = None,
    tag: str = "",
    epoch_hook=None,
    comm_hook=None,
    history: list | None = None,
) -> torch.nn.Module:
    """Train `model` in place (SGD, Nesterov momentum, one-cycle learning rate, random shifts); returns it in eval mode.

    Args:
        model: the model (moved to env.device); every rank builds it the same way.
        train_set: the training split (a Dataset); every rank holds all of it.
        settings: epochs, batch_size (the GLOBAL batch, split over the ranks), lr (one-cycle peak),
            momentum, weight_decay, augment_shift (pixels) and amp (bf16 autocast, CUDA only);
            a config.TrainSettings.
        seed: seeds torch, numpy and the shared sampling generator.
        env: this rank's :class:`DistEnv`; DistributedDataParallel wraps the model when world_size > 1.
        loss_fn: `loss_fn(model, x, y) -> (mean loss over the rank's samples, logits)`, called with the
            (possibly DDP-wrapped) model; default cross-entropy. Distillation plugs in here.
        state_dir: where rank 0 writes the epoch checkpoint and where the run resumes from (None: no
            checkpoints). The file is left in place: the caller removes it once its output exists.
        desc: name of the run in the progress bar and logs (part of the fingerprint).
        param_groups: torch optimizer groups (None: all parameters with settings.weight_decay), e.g.
            LSQ step sizes without weight decay.
        tag: anything else that identifies the run for resuming (e.g. the stage's code version).
        epoch_hook: called on every rank as `epoch_hook(epochs_done)` after each epoch (and its
            checkpoint), e.g. to keep a rewind point for pruning.
        comm_hook: (state, hook) for DDP's register_comm_hook when world_size > 1; default: the
            quantized gradient exchange of settings.grad_quant (:mod:`mpqflow.comm`), if any. A state
            that is an ExchangeState is checkpointed with the epoch and its summary logged at the end.
        history: a list that gets, on every rank, {epoch, loss, accuracy, step} per epoch (training loss
            and accuracy over all ranks; step: the exchange's step count, None without one).
    """
    gen = seed_everything(seed)  # the same draws on every rank: permutation, then one shift per batch
    loss_fn = loss_fn or cross_entropy_loss
    n, bs, world = len(train_set), settings.batch_size, env.world_size
    if bs < world:
        raise ValueError(f"batch_size {bs} is smaller than world_size {world}: some ranks would get no samples")
    fp = fingerprint(model, settings, seed=seed, world_size=world, samples=n, desc=desc, tag=tag)
    model.to(env.device).train()
    opt = _optimizer(model, settings, param_groups)
    steps = settings.epochs * steps_per_epoch(n, bs, world)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=steps, pct_start=0.15)
    grad_quant = getattr(settings, "grad_quant", None)
    if comm_hook is None and grad_quant is not None and env.distributed:
        gq = GradQuantState(**grad_quant, seed=seed, rank=env.rank, world_size=world, device=env.device)
        comm_hook = (gq, quantized_allgather_hook)
    exchange = comm_hook[0] if comm_hook is not None and isinstance(comm_hook[0], ExchangeState) else None
    start = _resume(state_dir, fp, env, model, opt, sched, gen, settings.epochs, exchange)
    net = _wrap(model, env, comm_hook)
    amp = getattr(settings, "amp", False) and env.device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    per_epoch = steps_per_epoch(n, bs, world)
    for epoch in range(start, settings.epochs):
        t0 = time.perf_counter()
        with _step_bar(f"{desc} epoch {epoch + 1} of {settings.epochs}", per_epoch, env) as bar:
            loss_sum, correct, total = _epoch(net, train_set, settings, gen, env, loss_fn, opt, sched, autocast, bar)
        loss_sum, correct, total = all_reduce_sum([loss_sum, correct, total], env)
        rate = total / max(time.perf_counter() - t0, 1e-9)
        if env.is_main:
            log.info(
                "%s epoch %d/%d loss %.4f train-acc %.4f %.0f samples/s",
                desc, epoch + 1, settings.epochs, loss_sum / total, correct / total, rate,
            )  # fmt: skip
        if history is not None:
            history.append(
                {"epoch": epoch + 1, "loss": loss_sum / total, "accuracy": correct / total, "step": _steps(exchange)}
            )
        if state_dir is not None:
            rng = _rng_states(env, exchange)  # a collective: every rank takes part
            if env.is_main:
                save_state(state_dir, _state(model, opt, sched, gen, rng, epoch + 1, fp))
        if epoch_hook is not None:
            epoch_hook(epoch + 1)
    if exchange is not None and env.is_main:
        log.info("%s gradient exchange (%s)", desc, exchange.summary())
    return model.eval()


# Seconds between two redraws of the step bar: on a terminal it redraws in place; into a rule's log
# (a file, or torchrun's pipe that the launcher copies there) every redraw becomes one more line,
# so a long epoch writes one line per half minute rather than thousands.
PROGRESS_INTERVAL_TTY_S = 2.0
PROGRESS_INTERVAL_LOG_S = 30.0


def _step_bar(label: str, steps: int, env: DistEnv) -> tqdm:
    """The progress bar over one epoch's steps: on rank 0 only, to stderr (the rule's log in a job).

    It shows the steps done, their rate and the epoch's time left, with rank 0's running mean loss.
    It reads nothing but the clock and the loss already computed, so it changes no result."""
    stream = sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    interval = PROGRESS_INTERVAL_TTY_S if tty else PROGRESS_INTERVAL_LOG_S
    return tqdm(total=steps, desc=label, unit="step", mininterval=interval, disable=not env.is_main, file=stream)


def _epoch(
    net, train_set, settings, gen, env: DistEnv, loss_fn, opt, sched, autocast, bar: tqdm
) -> tuple[float, int, int]:
    """One pass over the split, one `bar` step per optimizer step; (loss sum, correct, samples) of this rank."""
    perm = torch.randperm(len(train_set), generator=gen).numpy()
    bs, world = settings.batch_size, env.world_size
    loss_sum, correct, total = 0.0, 0, 0
    for s in range(0, len(perm), bs):
        batch = perm[s : s + bs]  # the global batch
        if len(batch) < world:
            continue  # a last batch too small to give every rank a sample (see steps_per_epoch)
        lo, hi = shard_bounds(len(batch), world, env.rank)
        x, y = stack(train_set, batch[lo:hi])
        x, y = _shift(x, settings.augment_shift, gen).to(env.device), y.to(env.device)
        with autocast():
            loss, logits = loss_fn(net, x, y)
        # DDP averages gradients over the ranks: weight this rank's mean so the sum is the global mean
        scaled = loss * (world * len(y) / len(batch)) if world > 1 else loss
        opt.zero_grad(set_to_none=True)
        scaled.backward()
        opt.step()
        sched.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
        # refresh=False: the bar redraws on update(), at most once per mininterval
        bar.set_postfix_str(f"loss {loss_sum / total:.3f}", refresh=False)
        bar.update()
    return loss_sum, correct, total


def _rng_states(env: DistEnv, exchange: ExchangeState | None = None) -> list[dict]:
    """Every rank's global torch RNG state (CPU, and its GPU's) and gradient-exchange state (its
    rounding generator and counters), in rank order: the ranks' dropout and rounding draws differ, so
    each resumes its own."""
    mine = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(env.device)
    if exchange is not None:
        mine["exchange"] = exchange.state_dict()
    if not env.distributed:
        return [mine]
    every: list = [None] * env.world_size
    dist.all_gather_object(every, mine)
    return every


def _set_rng_state(rng: dict, env: DistEnv, exchange: ExchangeState | None) -> None:
    torch.set_rng_state(rng["cpu"])
    if env.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], env.device)
    if exchange is not None:
        exchange.load_state_dict(rng["exchange"])


def _steps(exchange: ExchangeState | None) -> int | None:
    return None if exchange is None else exchange.step


def _state(model, opt, sched, gen: torch.Generator, rng: list[dict], epoch: int, fp: str) -> dict:
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": rng,
        "epoch": epoch,
        "fingerprint": fp,
    }
