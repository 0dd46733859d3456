"""Training losses beyond plain cross-entropy (:func:`mpqflow.train.cross_entropy_loss`), as `loss_fn`s
for :func:`mpqflow.train.fit`: each maps (model, x, y) to (loss, logits).

Usage:
    fit(student, train_set, settings, loss_fn=distillation_loss(teacher, weight=0.5, temperature=4.0), ...)

Not imported by :mod:`mpqflow.train` itself, so the FP training stage's code hash does not cover it:
editing a fine-tuning loss never retrains the FP model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(teacher: torch.nn.Module, weight: float, temperature: float):
    """loss_fn for :func:`mpqflow.train.fit`: (1 - weight) * CE + weight * T^2 * KL(teacher || student)
    on logits softened by T (Hinton et al.); weight 0 is plain cross-entropy."""

    def loss_fn(model, x, y):
        logits = model(x)  # (B, classes)
        loss = F.cross_entropy(logits, y)
        if weight == 0:
            return loss, logits
        with torch.no_grad():
            target = F.log_softmax(teacher(x) / temperature, dim=1)
        kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="batchmean", log_target=True)
        return (1 - weight) * loss + weight * temperature**2 * kl, logits

    return loss_fn
