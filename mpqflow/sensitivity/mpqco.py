"""MPQCO: a diagonal, weights-only loss estimate from per-sample gradients of the true-class logit.

Usage:
    payload = mpqco_batch(ctx, x, y, settings)      # {"sq_sum": (n,), "sq_squared_sum": (n,), "count": ()}
    dL = payload["sq_sum"] / (2 * payload["count"])  # estimated loss increase per option

Per sample n with true-class logit z_n of the base model (fixed layers quantized) and
ΔW_{l,o} = Q_o(W_l) - W_l:
    s_n(l, o) = <ΔW_{l,o}, ∇_{W_l} z_n> / z_n,   sq_sum[(l, o)] = Σ_n s_n(l, o)^2,
    sq_squared_sum[(l, o)] = Σ_n s_n(l, o)^4 (the second moment: a standard error, methods.mpqco_se).
Per-sample gradients come from torch.func (functional_call + vmap(grad)); the model runs in eval
mode (BatchNorm uses its running statistics, so samples stay independent inside vmap). Options
that differ only in a_bits share one value.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from .common import OptionIndex

__all__ = ["weight_deltas", "mpqco_batch"]

_CHUNK_BYTES = 256 << 20  # per-sample gradients held at once


def weight_deltas(ctx, idx: OptionIndex) -> dict[tuple[str, int], torch.Tensor]:
    """ΔW = Q_w(W_l) - W_l for every candidate layer l and every w_bits of the option table."""
    modules = dict(ctx.net.named_modules())
    out = {}
    for l in idx.layers:
        w = modules[l].weight.detach()
        for wb in sorted({o[0] for o in idx.options}):
            out[l, wb] = ctx.quantizer.quantized_weight(l, wb) - w
    return out


def mpqco_batch(ctx, x: torch.Tensor, y: torch.Tensor, settings: dict | None = None) -> dict:
    """MPQCO payload of one batch: sq_sum (n,) = Σ_n s_n^2, sq_squared_sum (n,) = Σ_n s_n^4 and count.

    Args:
        ctx: context.Context; x: (B, ...) inputs on ctx.device; y: (B,) labels.
        settings: optional `mpqco_chunk` (samples per vmap call; default from a memory bound).
    """
    settings = settings or {}
    idx = OptionIndex.from_table(ctx.table)
    net, q = ctx.net.eval(), ctx.quantizer
    previous = q.assignment
    q.apply(dict(ctx.table.fixed))  # candidates FP, fixed layers quantized: the base model
    try:
        deltas = weight_deltas(ctx, idx)
        params = {k: v.detach() for k, v in net.named_parameters()}
        buffers = {k: v.detach() for k, v in net.named_buffers()}
        names = [f"{l}.weight" for l in idx.layers]
        cand = {k: params[k] for k in names}

        def z_of(wc, xi, yi):
            out = functional_call(net, ({**params, **wc}, buffers), (xi.unsqueeze(0),))  # (1, C)
            z = out[0].gather(0, yi.reshape(1))[0]  # true-class logit
            return z, z

        per_sample = vmap(grad(z_of, has_aux=True), in_dims=(None, 0, 0))
        numel = sum(v.numel() for v in cand.values())
        chunk = settings.get("mpqco_chunk") or max(1, _CHUNK_BYTES // (4 * numel))
        w_bits = sorted({o[0] for o in idx.options})
        sq = torch.zeros(idx.L, len(w_bits), dtype=torch.float64, device=x.device)
        sq2 = torch.zeros_like(sq)
        with warnings.catch_warnings():
            # fake-quant kernels have no vmap batching rule: the fallback loop is correct, only slower
            warnings.filterwarnings("ignore", message=".*batching rule.*fake_quantize.*")
            for s in range(0, x.shape[0], chunk):
                g, z = per_sample(cand, x[s : s + chunk], y[s : s + chunk])  # g[name]: (b, *W.shape); z: (b,)
                for li, (l, name) in enumerate(zip(idx.layers, names)):
                    gl = g[name].reshape(g[name].shape[0], -1).double()  # (b, numel)
                    dw = torch.stack([deltas[l, wb].reshape(-1) for wb in w_bits]).double()  # (W, numel)
                    s_n = (gl @ dw.T) / z.double()[:, None]  # (b, W)
                    sq[li] += (s_n**2).sum(0)
                    sq2[li] += (s_n**4).sum(0)
    finally:
        q.apply(previous)
    col = [w_bits.index(o[0]) for o in idx.options]
    sq_sum = sq[:, col].reshape(-1)  # (L*K,), option i = l*K + k
    sq_squared_sum = sq2[:, col].reshape(-1)
    return {
        "sq_sum": sq_sum.cpu().numpy(),
        "sq_squared_sum": sq_squared_sum.cpu().numpy(),
        "count": np.int64(x.shape[0]),
    }
