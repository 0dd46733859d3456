"""Bias (and variance) correction of quantized weights per output channel (Banner et al. 2019, sec. 5).

    w_q = fake_quantize(w, ...)
    w_c = correct_bias(w, w_q, ch_axis=0)                 # per-channel means equal the FP means
    w_c = correct_bias(w, w_q, ch_axis=0, variance=True)  # and centered norms equal the FP norms

Quantization shifts each output channel's mean, mu_c = E[W_c] -> mu~_c = E[W~_c], which biases the
layer's outputs. The correction is w_c = xi_c (w~ - mu~_c) + mu_c with
xi_c = ||W_c - mu_c||_2 / ||W~_c - mu~_c||_2 (variance correction) or xi_c = 1 (bias only). The paper
writes xi_c (w~ + mu_c - mu~_c), whose mean is xi_c mu_c; the form here matches both moments exactly.
The corrected weights are off the integer grid by a per-channel shift and scale: deploy them by
folding xi_c into the channel's scale and the shift into the bias (the shift times sum of inputs).
"""

from __future__ import annotations

import torch

__all__ = ["bias_correction_terms", "correct_bias"]


def _channel_view(x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)  # (C, K)


def bias_correction_terms(
    w: torch.Tensor, w_q: torch.Tensor, ch_axis: int = 0, *, variance: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (xi, mu, mu_q), each (C,): w_c = xi * (w_q - mu_q) + mu along ch_axis.

    Args:
        w: FP weights.
        w_q: quantized (fake-quantized) weights, same shape.
        ch_axis: output-channel axis (0 for Conv2d/Linear weights).
        variance: also match the centered L2 norm (xi = ||w - mu|| / ||w_q - mu_q||; 1 where the
            quantized channel is constant).
    """
    if w.shape != w_q.shape:
        raise ValueError(f"shape mismatch: {tuple(w.shape)} vs {tuple(w_q.shape)}")
    wf, wq = _channel_view(w.detach().double(), ch_axis), _channel_view(w_q.detach().double(), ch_axis)
    mu, mu_q = wf.mean(1), wq.mean(1)
    xi = torch.ones_like(mu)
    if variance:
        num, den = (wf - mu[:, None]).norm(dim=1), (wq - mu_q[:, None]).norm(dim=1)
        xi = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), xi)
    return xi, mu, mu_q


def correct_bias(w: torch.Tensor, w_q: torch.Tensor, ch_axis: int = 0, *, variance: bool = False) -> torch.Tensor:
    """Corrected quantized weights (same shape and dtype as w_q); see :func:`bias_correction_terms`."""
    xi, mu, mu_q = bias_correction_terms(w, w_q, ch_axis, variance=variance)
    shape = [1] * w_q.dim()
    shape[ch_axis] = -1
    xi, mu, mu_q = (t.view(shape) for t in (xi, mu, mu_q))
    return (xi * (w_q.double() - mu_q) + mu).to(w_q.dtype)
