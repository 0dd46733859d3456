"""LIMPQ indicator pretraining (Tang et al., "Mixed-Precision Neural Network Quantization via Learned
Layer-wise Importance", ECCV 2022): one LSQ step size per (layer, bit-width) for the weights and one
for the input activation, learned jointly; the learned steps are the layers' importance indicators.

Usage:
    net = limpq_supernet(fp_net, ctx.table, ctx.quantizer, seed=0)  # FP model -> switchable LSQ model
    fit(net, train_set, settings, seed=0, env=env, loss_fn=limpq_loss, param_groups=step_sizes_without_decay(net, wd))
    payload = indicator_payload(net, ctx.table, samples=len(train_set))   # mpqflow.indicators' payload

One training step (:class:`LimpqSupernet.forward` + :func:`limpq_loss`), as LIMPQ trains:
  * M bit modes, highest first: mode k puts every candidate layer's weights at the k-th highest weight
    bit-width and its input at the k-th highest activation bit-width (the shorter list repeats its
    lowest); each mode runs with its own copy of every BatchNorm after a candidate layer, so the
    statistics of different precisions never mix;
  * the highest mode learns from the labels (cross-entropy), the others are distilled from its
    (detached) soft predictions;
  * one randomly drawn per-layer assignment (an option of the table per layer, each BatchNorm on the
    copy of its conv's weight bit-width) is distilled likewise;
  * the losses are summed and back-propagated once (the same gradient as LIMPQ's backward per pass).
The draws come from a generator seeded by (seed, step), with the step counter a buffer, so a resumed
run and every rank draw the same assignments. First and last layers stay at their fixed bits.
Weight steps start at LIMPQ's init max(|μ ± 3σ|)/2^(b-1), per tensor (an indicator is one number);
input steps at the calibrated quantizer's.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints import torch_load
from ..indicators import bit_lists
from ..io import save_torch
from ..quant.lsq import LsqQuantizer, calibrated_step, lsq_layers, prepare_lsq
from ..quant.prune import keep_masks, prune_layers, rewind, sparsity, weight_masks
from ..train import fit, step_sizes_without_decay
from ..train.state import clear_state

ESTIMATOR = "limpq"  # the estimator these indicators are: results/<model>/sensitivity/limpq/

__all__ = [
    "SwitchableQuantizer", "SwitchableBatchNorm2d", "LimpqSupernet", "limpq_supernet", "limpq_loss", "train_indicators",
]  # fmt: skip
log = logging.getLogger("mpqflow")
__all__ += ["indicator_payload"]


class SwitchableQuantizer(nn.Module):
    """One LsqQuantizer per bit-width; forward uses the active one (``bits``)."""

    def __init__(self, quantizers: dict[int, LsqQuantizer]):
        super().__init__()
        self.bank = nn.ModuleDict({str(b): q for b, q in quantizers.items()})
        self.bits = max(quantizers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bank[str(self.bits)](x)

    def step_of(self, bits: int) -> float:
        """The learned step at `bits` (per tensor: one number)."""
        return float(self.bank[str(bits)].effective_step().detach().reshape(-1)[0])


class SwitchableBatchNorm2d(nn.Module):
    """Copies of one BatchNorm2d, one per bit mode; forward uses copy ``active``."""

    def __init__(self, bn: nn.BatchNorm2d, copies: int):
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(bn) for _ in range(copies))
        self.active = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return self.copies[self.active](x)


def _following_batchnorms(net: nn.Module, candidates) -> dict[str, str]:
    """{BatchNorm2d name: the candidate conv registered right before it}, LIMPQ's pairing (module order)."""
    pairs, last = {}, None
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            last = name if name in candidates else None
        elif isinstance(m, nn.BatchNorm2d) and last is not None:
            pairs[name], last = last, None
    return pairs


class LimpqSupernet(nn.Module):
    """The model with switchable quantizers and BatchNorms; training forward returns (M + 1, B, classes):
    the M bit modes, highest first, then one random assignment. Eval forward: the current setting."""

    def __init__(self, net, table, bn_of: dict[str, str], seed: int):
        super().__init__()
        self.net, self.seed = net, int(seed)
        self.w_bits, self.a_bits = bit_lists(table)
        self.modes = max(len(self.w_bits), len(self.a_bits))
        self.options = [tuple(o) for o in table.options]
        self.candidates = list(table.candidates)
        self.bn_of = bn_of  # BatchNorm name -> its candidate conv
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))  # random assignments drawn so far

    def _layers(self):
        modules = dict(self.net.named_modules())
        return [modules[l] for l in self.candidates], {b: modules[b] for b in self.bn_of}

    def mode_bits(self, k: int) -> tuple[int, int]:
        """(w_bits, a_bits) of bit mode k (0 = highest)."""
        return self.w_bits[min(k, len(self.w_bits) - 1)], self.a_bits[min(k, len(self.a_bits) - 1)]

    def set_assignment(self, choice: dict[str, tuple[int, int]]) -> None:
        """Every candidate at its (w_bits, a_bits); each BatchNorm on the copy of its conv's weight bits."""
        layers, bns = self._layers()
        for name, m in zip(self.candidates, layers):
            m.weight_quant.bits, m.act_quant.bits = choice[name]
        for bn_name, bn in bns.items():
            w = choice[self.bn_of[bn_name]][0]
            bn.active = next(k for k in range(self.modes) if self.mode_bits(k)[0] == w)

    def set_mode(self, k: int) -> None:
        """Every candidate at bit mode k, every switchable BatchNorm on copy k."""
        self.set_assignment({l: self.mode_bits(k) for l in self.candidates})
        for bn in self._layers()[1].values():
            bn.active = k

    def random_assignment(self) -> dict[str, tuple[int, int]]:
        """One option of the table per candidate, from a generator seeded by (seed, draws)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.draws))
        picks = torch.randint(len(self.options), (len(self.candidates),), generator=gen).tolist()
        return {l: self.options[i] for l, i in zip(self.candidates, picks)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.net(x)
        outs = []
        for k in range(self.modes):
            self.set_mode(k)
            outs.append(self.net(x))
        self.set_assignment(self.random_assignment())
        self.draws += 1
        outs.append(self.net(x))
        self.set_mode(0)
        return torch.stack(outs)  # (M + 1, B, classes)


def limpq_supernet(net: nn.Module, table, quantizer, seed: int) -> LimpqSupernet:
    """The FP model made switchable (in place): candidates with a weight and an input quantizer per
    bit-width of the option table, fixed layers at their fixed bits, BatchNorm copies per bit mode."""
    w_bits, a_bits = bit_lists(table)
    assignment = {**{l: (w_bits[0], a_bits[0]) for l in table.candidates}, **dict(table.fixed)}
    prepare_lsq(net, assignment, quantizer=quantizer, weight_init="limpq", per_channel=False)
    layers = lsq_layers(net)
    for name in table.candidates:
        m = layers[name]
        signed = m.act_quant.signed
        weights, acts = {}, {}
        for b in w_bits:
            weights[b] = LsqQuantizer(b, True).to(m.weight.device)
            weights[b].init_limpq(m.weight)
        for b in a_bits:
            acts[b] = LsqQuantizer(b, signed, per_sample=True).to(m.weight.device)
            acts[b].init_scale(calibrated_step(quantizer.act_qparams(name, b), acts[b].qn, acts[b].qp))
        m.weight_quant, m.act_quant = SwitchableQuantizer(weights), SwitchableQuantizer(acts)
    bn_of = _following_batchnorms(net, set(table.candidates))
    modes = max(len(w_bits), len(a_bits))
    for bn_name in bn_of:
        parent, _, attr = bn_name.rpartition(".")
        owner = net.get_submodule(parent)
        setattr(owner, attr, SwitchableBatchNorm2d(getattr(owner, attr), modes))
    return LimpqSupernet(net, table, bn_of, seed)


def limpq_loss(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_fn of :func:`mpqflow.train.fit`: CE of the highest mode + soft cross-entropy of every other
    pass against the highest mode's detached softmax (LIMPQ's in-place distillation); its logits."""
    outs = model(x)  # (M + 1, B, classes)
    top = outs[0]
    target = F.softmax(top.detach(), dim=1)  # (B, classes)
    loss = F.cross_entropy(top, y)
    for out in outs[1:]:
        loss = loss + torch.sum(-target * F.log_softmax(out, dim=1), dim=1).mean()
    return loss, top


def indicator_payload(supernet: LimpqSupernet, table, samples: int) -> dict:
    """The learned steps as the indicator payload of :mod:`mpqflow.indicators` (rows: candidates)."""
    layers = lsq_layers(supernet.net)
    w_bits, a_bits = bit_lists(table)
    return {
        "w_indicator": np.array([[layers[l].weight_quant.step_of(b) for b in w_bits] for l in table.candidates]),
        "a_indicator": np.array([[layers[l].act_quant.step_of(b) for b in a_bits] for l in table.candidates]),
        "w_bits": np.asarray(w_bits, dtype=np.int64),
        "a_bits": np.asarray(a_bits, dtype=np.int64),
        "count": np.int64(samples),
    }


def _train_round(net, data, train, *, seed, env, tag, state_dir, epoch_hook=None) -> None:
    """One indicator training run of `train.epochs` epochs on the trainer (resumable in state_dir)."""
    fit(
        net,
        data,
        train,
        seed=seed,
        env=env,
        loss_fn=limpq_loss,
        state_dir=state_dir,
        desc=ESTIMATOR,
        param_groups=step_sizes_without_decay(net, train.weight_decay),  # after pruning: weight_orig
        tag=tag,
        epoch_hook=epoch_hook,
    )


def train_indicators(net, data, train, prune: dict | None, candidates, *, seed, env, tag, state_dir) -> dict:
    """Train the supernet's step sizes (the indicators) on `data`: one run of `train.epochs` epochs, or
    with `prune` (LIMPQP, :func:`_pruned_rounds`) the pruned rounds; the candidates' pruning masks
    ({} unpruned). Resumable from the epoch checkpoints in state_dir."""
    if prune is None:
        _train_round(net, data, train, seed=seed, env=env, tag=tag, state_dir=state_dir)
        return {}
    return _pruned_rounds(net, data, train, prune, candidates, seed=seed, env=env, tag=tag, state_dir=state_dir)


def _pruned_rounds(net, data, train, prune_cfg: dict, candidates, *, seed, env, tag, state_dir) -> dict:
    """LIMPQP: `iterations` rounds of training, pruning `amount` of each candidate layer's remaining
    weights and rewinding the survivors (and everything else: steps, BatchNorms) to their state at
    `rewind_epoch` of the first round; then the final round, whose steps are the indicators. The
    candidates' masks, {layer: bool array}.

    Resumable: each round checkpoints its epochs in state_dir/round_<r>; after each pruning,
    state_dir/prune.pt holds the rounds done, the masks and the rewind point (rank 0 writes)."""
    layers = {l: m for l, m in lsq_layers(net.net).items() if l in set(candidates)}
    rounds = prune_cfg["iterations"]
    done, snapshot = 0, None
    progress = _load(state_dir, PRUNE_FILE)
    if progress is not None:
        done, snapshot = int(progress["rounds"]), progress["snapshot"]
        keep_masks(net.net, {l: m.numpy() for l, m in progress["masks"].items()})
        rewind(net, snapshot)
    elif (rewound := _load(state_dir, REWIND_FILE)) is not None:
        snapshot = rewound["snapshot"]
    elif prune_cfg["rewind_epoch"] == 0:
        snapshot = copy.deepcopy(net.state_dict())

    def keep_rewind_point(epochs_done: int) -> None:
        nonlocal snapshot
        if snapshot is None and epochs_done == prune_cfg["rewind_epoch"]:
            snapshot = copy.deepcopy(net.state_dict())
            if env.is_main and state_dir is not None:
                save_torch(Path(state_dir) / REWIND_FILE, {"snapshot": snapshot})

    for r in range(done, rounds + 1):
        round_dir = None if state_dir is None else str(Path(state_dir) / f"round_{r}")
        _train_round(net, data, train, seed=seed, env=env, tag=f"{tag} round {r}", state_dir=round_dir,
                     epoch_hook=keep_rewind_point)  # fmt: skip
        if r == rounds:
            break
        prune_layers(layers, prune_cfg["method"], prune_cfg["amount"])
        rewind(net, snapshot)
        masks = weight_masks(layers)
        if env.is_main:
            log.info(
                "pruning round %d/%d: %.1f %% of the candidates' weights pruned", r + 1, rounds, 100 * sparsity(masks)
            )
            if state_dir is not None:
                masks_t = {l: torch.from_numpy(m) for l, m in masks.items()}
                save_torch(Path(state_dir) / PRUNE_FILE, {"rounds": r + 1, "masks": masks_t, "snapshot": snapshot})
                clear_state(round_dir)
    return weight_masks(layers)


PRUNE_FILE, REWIND_FILE = "prune.pt", "rewind.pt"


def _load(state_dir, name: str) -> dict | None:
    """A pruning checkpoint of state_dir, or None."""
    if state_dir is None or not (Path(state_dir) / name).is_file():
        return None
    return torch_load(Path(state_dir) / name, "LIMPQP pruning checkpoint")
