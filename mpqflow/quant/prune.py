"""Magnitude pruning of layer weights with torch.nn.utils.prune (LIMPQP's iterative pruning).

Usage:
    prune_layers(modules, "l1_unstructured", 0.2)   # prune 20 % of each layer's remaining weights
    masks = weight_masks(modules)                   # {name: (out, in, kh, kw) bool}
    rewind(net, snapshot)                           # weights back to an earlier state, masks kept
    mask_weights(net, masks)                        # evaluation: zero the pruned weights in place
    keep_masks(net, masks)                          # training: torch's reparametrisation keeps them 0
    bake_masks(net)                                 # weight = weight_orig * mask, reparametrisation gone

`l1_unstructured` removes the weights of smallest |w| of a layer, `ln_structured` its output channels
of smallest L2 norm (dim 0). Iterated, each call prunes `amount` of what is left (torch's
PruningContainer), so k rounds keep (1 - amount)^k of the weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import prune

__all__ = ["PRUNE_METHODS", "prune_layers", "weight_masks", "rewind", "mask_weights", "keep_masks", "bake_masks"]
__all__ += ["sparsity"]

PRUNE_METHODS = ("l1_unstructured", "ln_structured")


def prune_layers(modules: dict[str, nn.Module], method: str, amount: float) -> None:
    """Prune `amount` of the remaining weights of every module (its `weight` becomes weight_orig * mask)."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(PRUNE_METHODS)}")
    if not 0 < amount < 1:
        raise ValueError(f"pruning amount must be in (0, 1), got {amount}")
    for m in modules.values():
        if method == "l1_unstructured":
            prune.l1_unstructured(m, "weight", amount=amount)
        else:
            prune.ln_structured(m, "weight", amount=amount, n=2, dim=0)


def weight_masks(modules: dict[str, nn.Module]) -> dict[str, np.ndarray]:
    """{name: bool array of the weight's shape, True = kept} of the pruned modules."""
    return {n: m.weight_mask.detach().cpu().numpy().astype(bool) for n, m in modules.items() if prune.is_pruned(m)}


def sparsity(masks: dict[str, np.ndarray]) -> float:
    """Fraction of the masked weights that are pruned (0 for no masks)."""
    total = sum(m.size for m in masks.values())
    return 0.0 if total == 0 else 1.0 - sum(int(m.sum()) for m in masks.values()) / total


def rewind(net: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Load an earlier state_dict, taken before pruning, into the pruned `net`: each pruned layer's
    `weight` goes to its `weight_orig`, every mask stays."""
    state = net.state_dict()
    mapped = {}
    for key, value in snapshot.items():
        orig = key[: -len("weight")] + "weight_orig" if key.endswith("weight") else None
        mapped[orig if orig in state else key] = value
    missing = sorted(k for k in state if k not in mapped and not k.endswith("weight_mask"))
    if missing:
        raise ValueError(f"the rewind snapshot lacks {missing[:5]}")
    net.load_state_dict({**state, **mapped})


def _modules(net: nn.Module, masks: dict[str, np.ndarray]) -> dict[str, nn.Module]:
    modules = dict(net.named_modules())
    unknown = sorted(set(masks) - set(modules))
    if unknown:
        raise ValueError(f"pruning masks name layers {unknown[:5]} that the model does not have")
    for name, mask in masks.items():
        shape = tuple(modules[name].weight.shape)
        if shape != tuple(mask.shape):
            raise ValueError(f"layer {name!r}: pruning mask of shape {tuple(mask.shape)}, weight of {shape}")
    return {n: modules[n] for n in masks}


def mask_weights(net: nn.Module, masks: dict[str, np.ndarray]) -> None:
    """Zero the pruned weights in place (evaluation; no reparametrisation)."""
    for name, m in _modules(net, masks).items():
        with torch.no_grad():
            m.weight.mul_(torch.as_tensor(masks[name], device=m.weight.device, dtype=m.weight.dtype))


def keep_masks(net: nn.Module, masks: dict[str, np.ndarray]) -> None:
    """Apply the masks with torch's reparametrisation: training updates weight_orig, the used weight
    stays 0 where pruned."""
    for name, m in _modules(net, masks).items():
        prune.custom_from_mask(m, "weight", torch.as_tensor(masks[name], device=m.weight.device))


def bake_masks(net: nn.Module) -> None:
    """Make every pruned module's weight the plain Parameter weight_orig * mask (torch's prune.remove)."""
    for m in net.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
