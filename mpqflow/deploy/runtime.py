"""ONNX Runtime on an exported file: sessions, held-out evaluation against the simulation, latency.

    sess = open_session("m.onnx", device="cpu", threads=1)            # the file alone, no mpqflow graph code
    meta = file_metadata(sess)                                          # input_shape, mean, std, layers, ...
    m = evaluate_session(sess, iterate(test_set, 256), reference=lambda x: net(x))
    # {"top1", "top5", "loss", "n", "agreement", "max_logit_diff", "reference_top1", "provider"}
    lat = measure_latency(sess, batch_sizes=(1, 256), warmup=5, repeats=30)
    # {1: {"median_ms", "iqr_ms", "repeats"}, 256: {...}}

Sessions use ORT's default graph optimisations (ORT_ENABLE_ALL) unless told otherwise: that is how a
user's deployment runs the file, and what the export's bias handling is made for
(:mod:`mpqflow.deploy.onnx`). On ORT's CPU provider only 8-bit Q/DQ and QCDQ layers can become
int8 kernels (QLinearConv); native int4 / int2 layers run as DequantizeLinear → float Conv, so
sub-8-bit brings no speed on this runtime.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np
import onnxruntime as ort
import torch

from ..metrics import batch_scores

__all__ = ["OPTIMIZATION_LEVELS", "open_session", "file_metadata", "evaluate_session", "measure_latency"]
log = logging.getLogger("mpqflow")

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def open_session(
    path, device: str = "cpu", threads: int | None = None, optimization: str = "all"
) -> ort.InferenceSession:
    """An InferenceSession of the ONNX file `path`.

    Args:
        path: the .onnx file (written by :func:`mpqflow.deploy.onnx.export_onnx` or anyone).
        device: "cpu", or "cuda[:i]" for the CUDA provider when this onnxruntime has it (else the CPU
            provider with a warning: the session's ``get_providers()`` says which ran).
        threads: intra-op threads (None: ORT's default, all cores); inter-op stays 1 (sequential).
        optimization: one of :data:`OPTIMIZATION_LEVELS`.
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization {optimization!r}: expected one of {list(OPTIMIZATION_LEVELS)}")
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    opts.inter_op_num_threads = 1
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    providers: list = ["CPUExecutionProvider"]
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(str(device).partition(":")[2] or 0)
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            log.warning(
                "device %s: this onnxruntime has no CUDAExecutionProvider (providers: %s); running on the CPU "
                "(install onnxruntime-gpu for CUDA)",
                device,
                ", ".join(ort.get_available_providers()),
            )
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for a damaged or foreign file
        raise ValueError(f"{path}: onnxruntime cannot load it ({err})") from err


def file_metadata(sess: ort.InferenceSession) -> dict:
    """The export's ``mpqflow.*`` metadata_props, JSON-decoded, keys without the prefix."""
    props = sess.get_modelmeta().custom_metadata_map
    return {k.removeprefix("mpqflow."): json.loads(v) for k, v in props.items() if k.startswith("mpqflow.")}


def _run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@torch.no_grad()
def evaluate_session(
    sess: ort.InferenceSession,
    batches: Iterable,
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Top-1 / top-5 (fractions) and mean cross-entropy of the session's logits over (x, y) batches.

    With `reference` (e.g. the simulation, ``lambda x: net(x)`` under the applied quantizer), also
    ``agreement`` (fraction of images whose predicted class is the reference's), ``max_logit_diff``
    (largest |logit_ort - logit_ref| over all images and classes), ``differing_logits`` (fraction of
    logits not bit-identical) and ``reference_top1``.
    """
    n = top1 = top5 = agree = ref_top1 = differing = total_logits = 0
    loss, max_diff = 0.0, 0.0
    for x, y in batches:
        x = torch.as_tensor(x).float().cpu()
        y = torch.as_tensor(y).cpu()
        logits = torch.from_numpy(_run(sess, x.numpy()))  # (B, K)
        batch_loss, batch_top1, batch_top5 = batch_scores(logits, y)
        loss, top1, top5, n = loss + batch_loss, top1 + batch_top1, top5 + batch_top5, n + len(y)
        if reference is not None:
            ref = reference(x).detach().float().cpu()  # (B, K)
            if ref.shape != logits.shape:
                raise ValueError(f"reference logits {tuple(ref.shape)} vs the session's {tuple(logits.shape)}")
            agree += int((ref.argmax(1) == logits.argmax(1)).sum())
            ref_top1 += int((ref.argmax(1) == y).sum())
            diff = (ref - logits).abs()
            max_diff = max(max_diff, float(diff.max()))
            differing += int((ref != logits).sum())
            total_logits += ref.numel()
    if n == 0:
        raise ValueError("evaluate_session got no batch")
    out = {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "n": n, "provider": sess.get_providers()[0]}
    if reference is not None:
        out.update(
            agreement=agree / n,
            max_logit_diff=max_diff,
            differing_logits=differing / total_logits,
            reference_top1=ref_top1 / n,
        )
    return out


def _input_shape(sess: ort.InferenceSession, batch: int) -> list[int]:
    dims = sess.get_inputs()[0].shape  # e.g. ["batch", 3, 32, 32]
    rest = dims[1:]
    if not all(isinstance(d, int) for d in rest):
        raise ValueError(f"the model's input shape {dims} has symbolic dimensions beyond the batch")
    return [batch, *rest]


def measure_latency(
    sess: ort.InferenceSession, batch_sizes=(1,), warmup: int = 5, repeats: int = 30, seed: int = 0
) -> dict[int, dict]:
    """Wall-clock time of one ``sess.run`` per batch size: {batch: {median_ms, iqr_ms, repeats}}.

    Each batch size runs `warmup` untimed calls (allocation, kernel selection), then `repeats` timed
    ones on one fixed random input (N(0, 1), the scale of normalised images); IQR = 75th - 25th percentile.
    The session's threads are its own (:func:`open_session`'s `threads`).
    """
    if warmup < 0 or repeats < 2:
        raise ValueError(f"need warmup >= 0 and repeats >= 2, got {warmup} and {repeats}")
    rng, out = np.random.default_rng(seed), {}
    for batch in batch_sizes:
        x = rng.standard_normal(_input_shape(sess, int(batch))).astype(np.float32)
        for _ in range(warmup):
            _run(sess, x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _run(sess, x)
            times.append((time.perf_counter() - t0) * 1e3)
        q1, _, q3 = statistics.quantiles(times, n=4)
        out[int(batch)] = {"median_ms": statistics.median(times), "iqr_ms": q3 - q1, "repeats": repeats}
    return out
