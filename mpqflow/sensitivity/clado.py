"""CLADO: pairwise loss changes from forward passes only, cross-entropy and KL from the same passes.

Usage:
    payload = clado_batch(ctx, x, y, cfg.sensitivity.of_estimator("clado"))   # sums over the batch + count
    G = methods.clado_matrix(pooled, kind="ce")            # or kind="kl" (mpqflow/methods.py)

With the base assignment (fixed layers quantized) as reference, per sample n:
    L0 = loss(base);  L(i) = loss(base + option i);  L(i, j) = loss(base + i + j), layer(i) != layer(j)
    KL(p_fp || p_q), p_fp = softmax of the base model (so its base value is 0).
Payload: ce_base_sum (), ce_single_sum (n,), ce_pair_sum (n, n), kl_single_sum (n,), kl_pair_sum (n, n),
ce_gsq_sum (n, n), kl_gsq_sum (n, n), ce_dsq_sum (n, n), kl_dsq_sum (n, n), count (). Pair matrices are
symmetric with zero blocks within a layer; the dsq matrices are zero across layers.
    G[i, i] = 2 (L(i) - L0);  G[i, j] = L(i, j) - L(i) - L(j) + L0;  G = 0 within a layer (means).
The `*_gsq_sum` are Σ_n g_n[i, j]^2 of the per-sample entries g_n (the same formula on sample n's
losses), so every pooled G entry has a standard error (methods.clado_matrix_se). The `*_dsq_sum` are
Σ_n (g_n[i, i] - g_n[j, j])^2 for two options i, j of one layer: the paired difference of their
effects on the same samples, whose standard error (methods.clado_diff_se) is far below either
effect's own (most of a sample's loss change is shared by the options of a layer).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CladoConfig
from .common import OptionIndex
from .fx_engine import pairwise_fx, pairwise_reference

__all__ = ["ENGINES", "clado_batch", "clado_head"]

ENGINES = {"fast": pairwise_fx, "reference": pairwise_reference}


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def clado_head(y: torch.Tensor, loss_fn=None):
    """make_head for the pairwise engines: per perturbation, (sum of per-sample loss, sum of KL, the
    B per-sample losses, the B per-sample KLs): (M, 2 + 2B).

    Args:
        y: (B,) labels.
        loss_fn: per-sample loss(logits (B, C), y (B,)) -> (B,); default cross-entropy.
    """
    loss_fn = loss_fn or _cross_entropy

    def make(base_logits: torch.Tensor):
        B = base_logits.shape[0]
        logp0 = F.log_softmax(base_logits, dim=-1)  # (B, C)
        p0 = logp0.exp()

        def head(logits: torch.Tensor, M: int) -> torch.Tensor:
            loss = loss_fn(logits, y.repeat(M)).reshape(M, B)  # (M, B)
            logq = F.log_softmax(logits, dim=-1).reshape(M, B, -1)  # (M, B, C)
            kl = (p0 * (logp0 - logq)).sum(-1)  # (M, B)
            sums = torch.stack([loss.double().sum(1), kl.double().sum(1)], dim=1)  # (M, 2)
            return torch.cat([sums, loss.double(), kl.double()], dim=1)  # (M, 2 + 2B)

        return head

    return make


def _activate(ctx, idx: OptionIndex):
    base = dict(ctx.table.fixed)
    q = ctx.quantizer

    def activate(choice: dict) -> None:
        q.apply({**base, **{idx.layers[l]: idx.options[k] for l, k in choice.items()}})

    return activate


def clado_batch(ctx, x: torch.Tensor, y: torch.Tensor, settings: dict | None = None) -> dict:
    """CLADO payload of one batch (sums over its samples).

    Args:
        ctx: context.Context (net, quantizer, table, device).
        x: (B, ...) inputs on ctx.device; y: (B,) labels.
        settings: the sensitivity section's `clado_*` keys (:class:`mpqflow.config.CladoConfig`: engine,
            stack; every one required, the schema holds their defaults), plus two that no config sets:
            `loss_fn` (a per-sample loss, default cross-entropy) and `progress` (default True).
    """
    settings = settings or {}
    clado = CladoConfig.of(settings)
    engine = clado.engine
    if engine not in ENGINES:
        raise ValueError(f"unknown CLADO engine {engine!r}; expected one of {sorted(ENGINES)}")
    idx = OptionIndex.from_table(ctx.table)
    net = ctx.net.eval()
    kwargs = dict(progress=settings.get("progress", True))
    if engine == "fast":
        kwargs["stack"] = clado.stack
    previous = ctx.quantizer.assignment
    try:
        res = ENGINES[engine](
            net, x, list(idx.layers), idx.K, _activate(ctx, idx), clado_head(y, settings.get("loss_fn")), **kwargs
        )
    finally:
        ctx.quantizer.apply(previous)
    B = x.shape[0]
    ce, kl = slice(2, 2 + B), slice(2 + B, 2 + 2 * B)
    return {
        "ce_base_sum": np.float64(res.base[0]),
        "ce_single_sum": res.single[:, 0].copy(),
        "ce_pair_sum": res.pair[:, :, 0].copy(),
        "kl_single_sum": res.single[:, 1].copy(),
        "kl_pair_sum": res.pair[:, :, 1].copy(),
        "ce_gsq_sum": _g_squares(res.base[ce], res.single[:, ce], res.pair[:, :, ce], idx),
        "kl_gsq_sum": _g_squares(np.zeros(B), res.single[:, kl], res.pair[:, :, kl], idx),
        "ce_dsq_sum": _diff_squares(res.single[:, ce], idx),
        "kl_dsq_sum": _diff_squares(res.single[:, kl], idx),
        "count": np.int64(B),
    }


def _g_squares(l0: np.ndarray, li: np.ndarray, lij: np.ndarray, idx: OptionIndex) -> np.ndarray:
    """Σ_n g_n[i, j]^2 (n, n) of the per-sample CLADO entries, from per-sample losses l0 (B,),
    li (n, B), lij (n, n, B): g_n[i, i] = 2 (li - l0), g_n[i, j] = lij - li - lj + l0 across layers,
    0 within a layer. Row by row: (n, n, B) temporaries would not fit for large models."""
    n = li.shape[0]
    layer_of = idx.layer_of
    out = np.zeros((n, n))
    for i in range(n):
        g = lij[i] - li[i][None, :] - li + l0[None, :]  # (n, B)
        g[layer_of == layer_of[i]] = 0.0
        out[i] = (g**2).sum(1)
        out[i, i] = ((2 * (li[i] - l0)) ** 2).sum()
    return out


def _diff_squares(li: np.ndarray, idx: OptionIndex) -> np.ndarray:
    """Σ_n (g_n[i, i] - g_n[j, j])^2 (n, n) for options i, j of one layer (0 across layers), from the
    per-sample losses li (n, B): g_n[i, i] - g_n[j, j] = 2 (li[i] - li[j]) (the base loss cancels)."""
    n, K = li.shape[0], idx.K
    out = np.zeros((n, n))
    for start in range(0, n, K):
        d = 2.0 * (li[start : start + K, None, :] - li[None, start : start + K, :])  # (K, K, B)
        out[start : start + K, start : start + K] = (d**2).sum(-1)
    return out
