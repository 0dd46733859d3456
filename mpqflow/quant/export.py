"""Integer export of an LSQ fine-tuned model: integer weight codes and steps, something to deploy or hand on.

    state, meta = export_integer(net)                  # state: torch-saveable; meta: JSON-able summary
    save_export("q.pt", "q.json", net)                 # both written atomically
    net2 = load_export(make_fp_model(), read_export("q.pt"))   # reproduces net's outputs

``state`` = {"format", "meta", "tensors"}; ``tensors`` holds, for each LSQ layer ``L`` (see
:mod:`.lsq`), ``L.weight_int`` (int8 codes in [Qn, Qp]) and ``L.weight_scale`` (float32 steps, (C,)
per output channel or ()) when its weight is quantized, ``L.act_scale`` (float32 ()) when its input
is, and everything else of the model's state_dict unchanged (biases, BN, FP layers, as float).
The weight is codes · scale, bit for bit the fake-quantized weight of the fine-tuned model.
``meta["folded_bn"]`` = {conv: bn} BatchNorms folded into convs before fine-tuning (quant.fold_bn):
their convs' biases hold the BN and the BN entries are absent; :func:`load_export` folds the fresh
model's layout the same way. ``meta["layers"][L]`` = {w_bits, a_bits, w_signed, a_signed, w_per_channel,
weight_scale (list), act_scale (float), shape} (None for an FP part). Sub-8-bit codes are stored one
per int8 (not packed).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from ..checkpoints import torch_load
from ..io import damaged, regenerate_remedy, save_json, save_torch
from .fold import fold_structure
from .lsq import lsq_layers, lsq_range, prepare_lsq

__all__ = ["EXPORT_FORMAT", "export_integer", "save_export", "read_export", "load_export"]

EXPORT_FORMAT = "mpqflow-lsq-int/1"


def _layer_meta(m: nn.Module) -> dict:
    wq, aq = m.weight_quant, m.act_quant
    w_step = None if wq is None else wq.effective_step().detach().float().cpu()
    return {
        "w_bits": None if wq is None else wq.bits,
        "a_bits": None if aq is None else aq.bits,
        "w_signed": None if wq is None else wq.signed,
        "a_signed": None if aq is None else aq.signed,
        "w_per_channel": None if wq is None else wq.channels is not None,
        "weight_scale": None if wq is None else w_step.reshape(-1).tolist(),
        "act_scale": None if aq is None else float(aq.effective_step().detach()),
        "shape": list(m.weight.shape),
    }


def export_integer(net: nn.Module, folded_bn: dict | None = None) -> tuple[dict, dict]:
    """(state, meta) of the model's LSQ layers as integers plus its other state as float (CPU copies);
    `folded_bn` ({conv: bn}) says which BatchNorms were folded into `net`'s convs.

    Every quantizer must be initialised (ValueError otherwise). See the module docstring for the layout.
    """
    layers, tensors = lsq_layers(net), {}
    if not layers:
        raise ValueError("the model has no LSQ layers: prepare_lsq it first")
    meta = {"format": EXPORT_FORMAT, "folded_bn": dict(folded_bn or {}), "layers": {}}
    for name, m in layers.items():
        for part in (m.weight_quant, m.act_quant):
            if part is not None and (part.signed is None or not part.initialized):
                raise ValueError(f"layer {name!r}: a quantizer is not initialized (init_activations?)")
        meta["layers"][name] = e = _layer_meta(m)
        if m.weight_quant is not None:
            tensors[f"{name}.weight_int"] = m.weight_quant.integer(m.weight.detach()).cpu()  # (C, ...) int8
            tensors[f"{name}.weight_scale"] = m.weight_quant.effective_step().detach().float().cpu().clone()
        if m.act_quant is not None:
            tensors[f"{name}.act_scale"] = torch.tensor(e["act_scale"], dtype=torch.float32)
    replaced = {f"{n}.weight" for n, m in layers.items() if m.weight_quant is not None}
    quantizers = tuple(f"{n}.{part}." for n in layers for part in ("weight_quant", "act_quant"))
    for key, value in net.state_dict().items():
        if key not in replaced and not key.startswith(quantizers):  # the rest: bias, BN, FP layers
            tensors[key] = value.detach().cpu().clone()
    return {"format": EXPORT_FORMAT, "meta": meta, "tensors": tensors}, meta


def save_export(path_pt, path_json, net: nn.Module, folded_bn: dict | None = None) -> dict:
    """Write :func:`export_integer`'s state (torch.save) and meta (JSON), each atomically; returns meta."""
    state, meta = export_integer(net, folded_bn)
    save_torch(path_pt, state)
    save_json(path_json, meta)
    return meta


def read_export(path_pt) -> dict:
    """The state written by :func:`save_export` (torch.load with weights_only=True, on the CPU)."""
    state = torch_load(
        path_pt, "LSQ integer export", f"expected a file written by mpqflow's save_export; {regenerate_remedy(path_pt)}"
    )
    if not isinstance(state, Mapping) or state.get("format") != EXPORT_FORMAT:
        raise damaged(path_pt, f"not an LSQ integer export of format {EXPORT_FORMAT!r}")
    return state


def _prepare(net: nn.Module, layers: Mapping) -> None:
    """prepare_lsq with the exported bits, signs and weight granularity; steps are loaded afterwards."""
    for per_channel in (True, False):
        group = {n: e for n, e in layers.items() if bool(e["w_per_channel"]) == per_channel}
        signs = {n: e["a_signed"] for n, e in group.items() if e["a_bits"] is not None}
        assignment = {n: (e["w_bits"], e["a_bits"]) for n, e in group.items()}
        prepare_lsq(net, assignment, weight_init=None, per_channel=per_channel, act_signed=signs)


def _dequantized(name: str, e: Mapping, tensors: Mapping) -> torch.Tensor:
    codes, scale = _entry(tensors, f"{name}.weight_int"), _entry(tensors, f"{name}.weight_scale").float()
    qn, qp = lsq_range(e["w_bits"], e["w_signed"])
    if list(codes.shape) != list(e["shape"]) or int(codes.min()) < qn or int(codes.max()) > qp:
        raise ValueError(
            f"layer {name!r}: weight codes of shape {list(codes.shape)} outside {e['shape']} / [{qn}, {qp}]"
        )
    step = scale.reshape([-1] + [1] * (codes.dim() - 1)) if scale.numel() > 1 else scale.reshape(())
    return codes.float() * step  # (C, ...): the same product as LsqQuantizer.forward, so bit-identical


def _entry(tensors: Mapping, key: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"the export has no entry {key!r}: a different architecture?")
    return tensors[key]


def load_export(net: nn.Module, state: Mapping, meta: Mapping | None = None) -> nn.Module:
    """Make a fresh FP model of the same architecture the exported LSQ model (in place; returned in eval
    mode, as a loaded model is used: a forward in training mode would overwrite the BatchNorm statistics).

    Args:
        net: FP model (no LSQ layers yet), on any device.
        state: :func:`export_integer`'s (or :func:`read_export`'s) state.
        meta: optional JSON meta; must equal the state's own.
    """
    if not isinstance(state, Mapping) or state.get("format") != EXPORT_FORMAT:
        raise ValueError(f"state is not an LSQ integer export of format {EXPORT_FORMAT!r}")
    if meta is not None and dict(meta) != dict(state["meta"]):
        raise ValueError("meta does not match the state's meta (exports of different models?)")
    if lsq_layers(net):
        raise ValueError(f"load_export needs a fresh FP model; it has LSQ layers {sorted(lsq_layers(net))}")
    layers, tensors = state["meta"]["layers"], state["tensors"]
    fold_structure(net, state["meta"].get("folded_bn", {}))  # absent in exports made before fold_bn: unfolded
    _prepare(net, layers)
    own, full, used = net.state_dict(), {}, set()
    for name, e in layers.items():
        if e["w_bits"] is not None:
            full[f"{name}.weight"] = _dequantized(name, e, tensors)
            full[f"{name}.weight_quant.step"] = _entry(tensors, f"{name}.weight_scale")
            used |= {f"{name}.weight_int", f"{name}.weight_scale"}
        if e["a_bits"] is not None:
            full[f"{name}.act_quant.step"] = _entry(tensors, f"{name}.act_scale")
            used.add(f"{name}.act_scale")
    for key in own:
        if key.endswith((".quant_min", ".quant_max")) and key.rpartition(".")[0].rpartition(".")[0] in layers:
            full[key] = own[key]  # the ranges prepare_lsq set from the exported bits and signs
        elif key not in full:
            full[key], _ = _entry(tensors, key), used.add(key)
    if set(tensors) - used:
        raise ValueError(f"the export has entries the model does not: {sorted(set(tensors) - used)[:5]}")
    net.load_state_dict(full)
    return net.eval()
