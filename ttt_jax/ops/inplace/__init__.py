"""In-Place TTT (SPEC 3.3): the MLP down projection as a chunk-wise fast weight."""

from ttt_jax.ops.core.checks import BACKWARDS
from ttt_jax.ops.inplace.op import InPlaceState, inplace_ttt
from ttt_jax.ops.inplace.prefix import NAMES, PREFIXES
from ttt_jax.ops.inplace.targets import CONV_KERNEL_SIZES

# The target convolution's modes (the kernel size each implies is `CONV_KERNEL_SIZES[mode]`).
CONV_MODES = tuple(CONV_KERNEL_SIZES)

__all__ = [
    "BACKWARDS",
    "CONV_KERNEL_SIZES",
    "CONV_MODES",
    "NAMES",
    "PREFIXES",
    "InPlaceState",
    "inplace_ttt",
]
