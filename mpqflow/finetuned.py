"""The fine-tuned model file: an LSQ-quantized model with its learned steps, rebuilt from the file alone.

Usage:
    save_finetuned("results/m/finetuned/clado/set_4x0/avg_bits-2.5.pt", net, build, per_channel, record, sha)
    ckpt = read_finetuned(path)        # {"format", "build", "per_channel", "state_dict", "assignment", "record", ...}
    net = load_finetuned(path)         # the model in eval mode (or load_finetuned(ckpt, "cuda"))

`build` holds what :func:`mpqflow.models.build_model` needs (arch, in_channels, image_size,
num_classes); `folded_bn` ({conv: bn}, empty without quant.fold_bn) the BatchNorms folded into
convs before fine-tuning (the rebuilt architecture is folded the same way before the weights load);
`record` says what was fine-tuned and how (method, set, budget or option, epochs, processes,
distillation, seconds). The file is read with ``weights_only``: no code is unpickled.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoints import torch_load
from .io import damaged, regenerate_remedy, save_torch
from .models import build_model
from .quant import fold_structure, lsq_assignment, prepare_lsq

__all__ = ["FINETUNED_FORMAT", "save_finetuned", "read_finetuned", "load_finetuned"]

FINETUNED_FORMAT = "mpqflow-finetuned/1"
_KEYS = ("build", "per_channel", "state_dict", "assignment", "record", "checkpoint_sha256")


def save_finetuned(
    path,
    net: nn.Module,
    build: dict,
    per_channel: bool,
    record: dict,
    checkpoint_sha256: str,
    folded_bn: dict | None = None,
):
    """Write the LSQ model `net` (from :func:`mpqflow.quant.prepare_lsq`) atomically, with how to
    rebuild it (`folded_bn`: the {conv: bn} folded into it before fine-tuning)."""
    net = net.cpu().eval()
    assignment = {l: list(o) for l, o in lsq_assignment(net).items()}
    save_torch(path, {
        "format": FINETUNED_FORMAT, "build": build, "per_channel": per_channel, "state_dict": net.state_dict(),
        "assignment": assignment, "record": record, "checkpoint_sha256": checkpoint_sha256,
        "folded_bn": dict(folded_bn or {}),
    })  # fmt: skip


def read_finetuned(path) -> dict:
    """The contents of a file written by :func:`save_finetuned`; ValueError naming the file otherwise."""
    ckpt = torch_load(
        path,
        "fine-tuned model",
        f"expected results/<model>/finetuned/<method>/.../<budget>.pt; {regenerate_remedy(path)}",
    )
    if not isinstance(ckpt, dict) or ckpt.get("format") != FINETUNED_FORMAT:
        raise damaged(path, f"not a fine-tuned model written by mpqflow (format {FINETUNED_FORMAT!r})")
    missing = [k for k in _KEYS if k not in ckpt]
    if missing:
        raise damaged(path, f"not a whole fine-tuned model file: {missing} missing")
    return ckpt


def load_finetuned(path_or_ckpt, device="cpu") -> nn.Module:
    """The fine-tuned model (eval mode) of a file (or of what :func:`read_finetuned` returned): the
    architecture rebuilt, LSQ quantizers at the recorded bits, the learned weights and steps loaded."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else read_finetuned(path_or_ckpt)
    state = ckpt["state_dict"]
    assignment = {l: tuple(o) for l, o in ckpt["assignment"].items()}
    # An input grid's sign is learned state, not config: read it from the saved quantizer's range.
    act_signed = {l: bool(state[f"{l}.act_quant.quant_min"] < 0) for l, (_, a) in assignment.items() if a is not None}
    # Files written before fold_bn existed have no folded_bn: they were fine-tuned unfolded.
    fp_net = fold_structure(build_model(**ckpt["build"]), ckpt.get("folded_bn", {}))
    net = prepare_lsq(
        fp_net,
        assignment,
        weight_init=None,
        per_channel=ckpt["per_channel"],
        act_signed=act_signed,
    )
    net.load_state_dict(state)
    return net.to(torch.device(device)).eval()
