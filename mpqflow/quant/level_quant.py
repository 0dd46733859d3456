"""Quantization onto levels: it lives in :mod:`mpqflow.comm.level_quant` (see :mod:`.levels`); this
module keeps the import path."""

from ..comm.level_quant import *  # noqa: F403
from ..comm.level_quant import __all__  # noqa: F401
