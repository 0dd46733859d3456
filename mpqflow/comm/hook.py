"""DistributedDataParallel communication hooks that exchange quantized gradients, and measure the exchange.

Usage (every rank, after wrapping the model):
    state = GradQuantState(method="alq", bits=3, bucket_size=512, norm="l2", update_iters=(10, 100),
                           seed=0, rank=env.rank, world_size=env.world_size, device=env.device)
    ddp.register_comm_hook(state, quantized_allgather_hook)
    ...   # state.wire_bytes: bytes this process wrote to its sockets; state.variance: (step, normalised variance)
    baseline = ExchangeState(rank=env.rank, world_size=env.world_size)
    ddp.register_comm_hook(baseline, float_allreduce_hook)      # DDP's own float all-reduce, measured alike

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

Measured, not computed: `wire_bytes` adds up, around every collective the hook runs, the growth of
this process's `wchar` in /proc/self/io (bytes passed to write-family system calls: gloo's TCP sends;
its 288-byte message headers included). It is None where that cannot see the traffic (no
/proc/self/io, or a backend other than gloo: NCCL moves data without system calls). `variance`
holds, per step, this rank's exact E||Q(g) - g||^2 / ||g||^2 over the rounding draws (the normalised
variance ALQ/AMQ minimise; no sampling). The whole state is checkpointed with the epoch (state_dict),
so a resumed run continues with the same levels, draws and counts.
"""

import contextlib

import torch
import torch.distributed as dist

from ..levels.fit import exponential_levels, fit_levels, levels_for_bits, uniform_levels
from .codes import decode, encode_with_variance, pack_codes, unpack_codes

__all__ = [
    "GRAD_QUANT_METHODS",
    "ExchangeState",
    "GradQuantState",
    "float_allreduce_hook",
    "initial_levels",
    "quantized_allgather_hook",
    "wire_bytes_written",
]

GRAD_QUANT_METHODS = ("qsgd", "nuqsgd", "alq", "amq", "alq_nb", "amq_nb")
ADAPTIVE = ("alq", "amq", "alq_nb", "amq_nb")


def wire_bytes_written() -> int | None:
    """Bytes this process has passed to write()-family system calls (Linux /proc/self/io wchar); None if unknown."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def initial_levels(method: str, bits: int) -> torch.Tensor:
    """(n,) the levels a method starts from: uniform for qsgd, exponential p = 1/2 for the others
    (the adaptive ones replace them at their first update)."""
    if method not in GRAD_QUANT_METHODS:
        raise ValueError(f"unknown gradient quantizer {method!r}; expected one of {', '.join(GRAD_QUANT_METHODS)}")
    n = levels_for_bits(bits)
    return uniform_levels(n) if method == "qsgd" else exponential_levels(n, 0.5)


class ExchangeState:
    """Counters of a gradient exchange: steps, bytes handed to collectives, bytes measured on the wire."""

    method = "none"
    layout_dependent = False  # an element-wise exchange: DDP's bucket layout does not change the result
    _SAVED = ("step", "bytes_sent", "bytes_full_precision", "wire_bytes")

    def __init__(self, *, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.step = 0  # optimizer steps seen (completed backward passes)
        self.bytes_sent = 0  # what this rank handed to collectives, all buckets, all steps
        self.bytes_full_precision = 0  # what the same gradients take as float32
        measurable = dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"
        self.wire_bytes = 0 if measurable and wire_bytes_written() is not None else None

    @contextlib.contextmanager
    def on_the_wire(self):
        """Adds the bytes this process writes inside the block to wire_bytes (collectives only, please)."""
        before = wire_bytes_written() if self.wire_bytes is not None else None
        yield
        if before is not None:
            self.wire_bytes += wire_bytes_written() - before

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._SAVED}

    def load_state_dict(self, state: dict) -> None:
        for k in self._SAVED:
            setattr(self, k, state[k])

    def summary(self) -> str:
        wire = "not measurable" if self.wire_bytes is None else f"{self.wire_bytes} bytes written to the wire"
        return (
            f"{self.step} steps, {self.bytes_sent} bytes handed to collectives per process "
            f"({self.bytes_sent / max(self.bytes_full_precision, 1):.4f} of float32), {wire}"
        )


class GradQuantState(ExchangeState):
    """What the quantizing hook keeps between calls: levels, the rounding generator, counters, variance."""

    _SAVED = ExchangeState._SAVED + ("levels", "updates", "variance", "generator_state")
    layout_dependent = True  # which coordinates share a bucket norm depends on DDP's bucket layout

    def __init__(self, *, method, bits, bucket_size, norm, update_iters, seed, rank, world_size, device="cpu"):
        super().__init__(rank=rank, world_size=world_size)
        self.method, self.bits, self.bucket_size, self.norm = method, int(bits), int(bucket_size), norm
        self.update_iters = {int(i) for i in update_iters}
        self.levels = initial_levels(method, self.bits).double().to(device)
        # rounding draws on the gradients' device, independent per rank
        self.generator = torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(rank))
        self.updates = 0  # level refits done
        self.variance: list[tuple[int, float]] = []  # (step, E||Q(g) - g||^2 / ||g||^2) of this rank
        self._pending = []  # gradients of an update step, for the refit
        self._step_variance = self._step_norm2 = 0.0

    @property
    def generator_state(self) -> torch.Tensor:
        return self.generator.get_state()

    @generator_state.setter
    def generator_state(self, value: torch.Tensor) -> None:
        self.generator.set_state(value)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.levels = self.levels.to(self.generator.device)
        self.variance = [tuple(v) for v in self.variance]

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
            with self.on_the_wire():
                dist.broadcast(levels, src=0)
        self.levels, self.updates = levels, self.updates + 1

    def summary(self) -> str:
        return f"{self.method}, {self.bits} bits: {super().summary()}, {self.updates} level refits"


def _done(result: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut = torch.futures.Future()
    fut.set_result(result)
    return fut


# No `from __future__ import annotations` here: DDP's register_comm_hook inspects these annotations
# and accepts only the real objects (bucket: GradBucket, return: Future[Tensor]).
def quantized_allgather_hook(state: GradQuantState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the mean over ranks of every rank's quantized gradient bucket."""
    grad = bucket.buffer().detach()  # (numel,) this rank's flat gradient of the bucket, on its device
    codes, norms, variance = encode_with_variance(grad, state.levels, state.bucket_size, state.generator,
                                                  norm=state.norm)  # fmt: skip
    packed = pack_codes(codes, state.bits)  # (ceil(numel * bits / 8),) uint8
    world = state.world_size
    all_packed, all_norms = [packed], [norms]
    if world > 1:
        all_packed = [torch.empty_like(packed) for _ in range(world)]
        all_norms = [torch.empty_like(norms) for _ in range(world)]
        with state.on_the_wire():
            dist.all_gather(all_packed, packed)
            dist.all_gather(all_norms, norms)
    mean = (
        sum(
            decode(unpack_codes(p, state.bits, grad.numel()), n, state.levels, state.bucket_size)
            for p, n in zip(all_packed, all_norms)
        )
        / world
    )
    state.bytes_sent += packed.nbytes + norms.nbytes
    state.bytes_full_precision += grad.numel() * 4
    state._step_variance += variance
    state._step_norm2 += float(grad.double().square().sum())
    if state.method in ADAPTIVE and state.step + 1 in state.update_iters:
        state._pending.append(grad.clone())
    if bucket.is_last():
        state.step += 1
        state.variance.append((state.step, state._step_variance / max(state._step_norm2, 1e-300)))
        state._step_variance = state._step_norm2 = 0.0
        if state._pending:
            state.refit(torch.cat(state._pending))
            state._pending = []
    return _done(mean.to(device=grad.device, dtype=grad.dtype))


def float_allreduce_hook(state: ExchangeState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: DDP's own exchange (float all-reduce of the bucket, then / world), measured alike."""
    grad = bucket.buffer()
    with state.on_the_wire():
        dist.all_reduce(grad)
    state.bytes_sent += grad.nbytes
    state.bytes_full_precision += grad.numel() * 4
    if bucket.is_last():
        state.step += 1
    return _done(grad.div_(state.world_size))
