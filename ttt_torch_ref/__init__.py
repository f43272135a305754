"""ttt_torch_ref: a small, plain PyTorch reference of the TTT-Linear and TTT-MLP ops and layers.

Written independently of `ttt_jax` and never imported by it; only `parity_tests/` sees both.
"""

# Ops (primal form) and their per-sample fast-weight states.
from .ttt import TTTLinearState, TTTMLPState, ttt_linear, ttt_mlp

# The layer around the ops.
from .ttt_layer import TTTLayerConfigRef, TTTLayerRef

__all__ = [
    "TTTLayerConfigRef",
    "TTTLayerRef",
    "TTTLinearState",
    "TTTMLPState",
    "ttt_linear",
    "ttt_mlp",
]
