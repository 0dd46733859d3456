"""ALQ/AMQ level fitting, for weights (QuantScheme.levels) and gradients alike: it lives in
:mod:`mpqflow.comm.levels` so that training with quantized gradient exchange imports no quantizer
code (editing the quantizers must not retrain the model). This module keeps the import path."""

from ..comm.levels import *  # noqa: F403
from ..comm.levels import __all__  # noqa: F401
