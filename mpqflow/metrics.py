"""Top-1, top-5 and mean cross-entropy of a model over a dataset: the measurement every stage shares.

Usage:
    metrics = evaluate(model, test_set, batch_size=256, device="cpu")   # {"top1", "top5", "loss", "n"}

Quantized assignments (size, bits, bit-rates) are evaluated by :mod:`mpqflow.evaluate`. A tqdm bar
over the batches goes to stderr (the rule's log) once an evaluation has run for a few seconds.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import iterate

__all__ = ["evaluate", "batch_scores"]


def batch_scores(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
    """(summed cross-entropy, top-1 hits, top-5 hits) of one batch's logits (B, K) against labels (B,)."""
    loss = float(F.cross_entropy(logits, y, reduction="sum"))
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]  # (B, k)
    return loss, int(hits[:, 0].sum()), int(hits.any(1).sum())


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 256, device="cpu", indices=None, workers: int = 0) -> dict:
    """Top-1/top-5 accuracy (fractions) and mean cross-entropy of `model` on `dataset`."""
    model.eval()
    n, top1, top5, loss = 0, 0, 0, 0.0
    batches = iterate(dataset, batch_size, indices, workers)
    total = math.ceil((len(dataset) if indices is None else len(indices)) / batch_size)
    bar = tqdm(batches, desc="evaluate", total=total, unit="batch", mininterval=2, delay=5, file=sys.stderr)
    for x, y in bar:
        x, y = x.to(device), y.to(device)
        batch_loss, batch_top1, batch_top5 = batch_scores(model(x), y)
        loss, top1, top5, n = loss + batch_loss, top1 + batch_top1, top5 + batch_top5, n + len(y)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "n": n}
