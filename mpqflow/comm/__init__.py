"""Quantized gradient exchange for data-parallel SGD (ALQ/AMQ, Faghri et al. 2020; QSGD; NUQSGD).

:mod:`.codes` turns a gradient into bucket norms and packed `bits`-bit codes and back; :mod:`.hook`
is the DistributedDataParallel communication hook that all-gathers those codes instead of
all-reducing floats, with the levels of :mod:`mpqflow.levels.fit` refitted during training. It imports no quantizer
code (:mod:`mpqflow.quant`): editing the quantizers does not retrain.
"""

from .codes import decode, encode, encode_with_variance, pack_codes, packed_bytes, unpack_codes
from .hook import (
    GRAD_QUANT_METHODS,
    ExchangeState,
    GradQuantState,
    float_allreduce_hook,
    initial_levels,
    quantized_allgather_hook,
    wire_bytes_written,
)

__all__ = [
    "GRAD_QUANT_METHODS",
    "ExchangeState",
    "GradQuantState",
    "decode",
    "encode",
    "encode_with_variance",
    "float_allreduce_hook",
    "initial_levels",
    "pack_codes",
    "packed_bytes",
    "quantized_allgather_hook",
    "unpack_codes",
    "wire_bytes_written",
]
