"""Train a full-precision model (the embedded default trains ResNet-20 on digits in about a minute).

Usage:
    model = train_model(model, train_set, settings, seed=0, device="cpu")   # settings: config.TrainSettings
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import stack
from .runtime import seed_everything

__all__ = ["train_model"]
log = logging.getLogger("mpqflow")


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to max_shift pixels with zero padding (per batch)."""
    if max_shift == 0:
        return x
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    padded = F.pad(x, (max_shift,) * 4)  # (B, C, H+2s, W+2s)
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def train_model(model, train_set, cfg, seed: int, device="cpu"):
    """Train `model` in place on `train_set` with `cfg` (a config.TrainSettings); returns it in eval mode.

    SGD with Nesterov momentum and a one-cycle learning rate, random-shift augmentation."""
    gen = seed_everything(seed)
    model.to(device).train()
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )
    steps = cfg.epochs * -(-len(train_set) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    bar = tqdm(range(cfg.epochs), desc="train", mininterval=2)
    for epoch in bar:
        perm = torch.randperm(len(train_set), generator=gen).numpy()
        total, correct, loss_sum = 0, 0, 0.0
        for s in range(0, len(perm), cfg.batch_size):
            x, y = stack(train_set, perm[s : s + cfg.batch_size])
            x, y = _shift(x, cfg.augment_shift, gen).to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
        log.info("epoch %d loss %.4f train-acc %.4f", epoch, loss_sum / total, correct / total)
    return model.eval()
