"""A DistributedDataParallel communication hook that exchanges quantized gradients.

Usage (every rank, after wrapping the model):
    state = GradQuantState(method="alq", bits=3, bucket_size=512, norm="l2", update_iters=(10, 100),
                           seed=0, rank=env.rank, world_size=env.world_size)
    ddp.register_comm_hook(state, quantized_allgather_hook)
    ...                                   # state.bytes_sent / state.bytes_full_precision: on the wire

Each DDP bucket's flat gradient is encoded (:func:`mpqflow.comm.codes.encode`: bucket norms and one
`bits`-bit code per coordinate), packed, and all-gathered with its norms; every rank decodes all the
ranks' codes and averages them. So the bytes that cross the wire are the packed codes and float32
norms, not a float all-reduce of dequantized values. Rounding draws come from a generator seeded by
(seed, rank): independent noise per rank, reproducible runs.

Levels: `qsgd` uniform, `nuqsgd` exponential with p = 1/2 (fixed); `alq` / `amq` (and the norm-based
`alq_nb` / `amq_nb`, fitted to the mixture of per-bucket truncated normals weighted by the bucket
norms) are refitted at the optimizer steps in `update_iters` from that step's full gradient on rank
0, then broadcast, so every rank applies the same levels from the next step on. Steps are counted
by the hook itself (a step ends with DDP's last bucket).
"""

import torch
import torch.distributed as dist

from .codes import decode, encode, pack_codes, unpack_codes
from .levels import exponential_levels, fit_levels, levels_for_bits, uniform_levels

__all__ = ["GRAD_QUANT_METHODS", "GradQuantState", "quantized_allgather_hook", "initial_levels"]

GRAD_QUANT_METHODS = ("qsgd", "nuqsgd", "alq", "amq", "alq_nb", "amq_nb")
ADAPTIVE = ("alq", "amq", "alq_nb", "amq_nb")


def initial_levels(method: str, bits: int) -> torch.Tensor:
    """(n,) the levels a method starts from: uniform for qsgd, exponential p = 1/2 for the others
    (the adaptive ones replace them at their first update)."""
    if method not in GRAD_QUANT_METHODS:
        raise ValueError(f"unknown gradient quantizer {method!r}; expected one of {', '.join(GRAD_QUANT_METHODS)}")
    n = levels_for_bits(bits)
    return uniform_levels(n) if method == "qsgd" else exponential_levels(n, 0.5)


class GradQuantState:
    """What the hook keeps between calls: levels, the step counter, the rounding generator, byte counts."""

    def __init__(self, *, method, bits, bucket_size, norm, update_iters, seed, rank, world_size):
        self.method, self.bits, self.bucket_size, self.norm = method, int(bits), int(bucket_size), norm
        self.update_iters = {int(i) for i in update_iters}
        self.levels = initial_levels(method, self.bits)
        self.rank, self.world_size = rank, world_size
        self.seed = int(seed) * 1_000_003 + int(rank)
        self.generator = None  # on the gradients' device, made at the first bucket
        self.step = 0  # optimizer steps seen (completed backward passes)
        self.updates = 0  # level refits done
        self.bytes_sent = 0  # this rank's packed codes + norms, all buckets, all steps
        self.bytes_full_precision = 0  # what the same gradients would take as float32
        self._pending = []  # gradients of an update step, for the refit

    def refit(self, grad: torch.Tensor) -> None:
        """New levels from one step's full gradient on rank 0, broadcast to every rank (the tensor on
        the gradient's device: NCCL broadcasts CUDA tensors only)."""
        levels = torch.empty(levels_for_bits(self.bits), dtype=torch.float64, device=grad.device)
        if self.rank == 0:
            method = self.method.removesuffix("_nb")
            fitted = fit_levels(grad.cpu(), levels.numel(), method, bucket_size=self.bucket_size, norm=self.norm,
                                mixture=self.method.endswith("_nb"))  # fmt: skip
            levels.copy_(fitted.double())
        if self.world_size > 1:
            dist.broadcast(levels, src=0)
        self.levels, self.updates = levels, self.updates + 1


# No `from __future__ import annotations` here: DDP's register_comm_hook inspects these annotations
# and accepts only the real objects (bucket: GradBucket, return: Future[Tensor]).
def quantized_allgather_hook(state: GradQuantState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the mean over ranks of every rank's quantized gradient bucket."""
    grad = bucket.buffer().detach()  # (numel,) this rank's flat gradient of the bucket, on its device
    if state.generator is None:
        state.generator = torch.Generator(device=grad.device).manual_seed(state.seed)
    codes, norms = encode(grad, state.levels, state.bucket_size, state.generator, norm=state.norm)
    packed = pack_codes(codes, state.bits)  # (ceil(numel * bits / 8),) uint8
    world = state.world_size
    all_packed, all_norms = [packed], [norms]
    if world > 1:
        all_packed = [torch.empty_like(packed) for _ in range(world)]
        all_norms = [torch.empty_like(norms) for _ in range(world)]
        dist.all_gather(all_packed, packed)
        dist.all_gather(all_norms, norms)
    mean = (
        sum(
            decode(unpack_codes(p, state.bits, grad.numel()), n, state.levels, state.bucket_size)
            for p, n in zip(all_packed, all_norms)
        )
        / world
    )
    state.bytes_sent += packed.nbytes + norms.nbytes  # what this rank hands to all_gather
    state.bytes_full_precision += grad.numel() * 4
    if state.method in ADAPTIVE and state.step + 1 in state.update_iters:
        state._pending.append(grad.clone())
    if bucket.is_last():
        state.step += 1
        if state._pending:
            state.refit(torch.cat(state._pending))
            state._pending = []
    fut = torch.futures.Future()
    fut.set_result(mean.to(device=grad.device, dtype=grad.dtype))
    return fut
