"""ttt_torch_ref: a small, plain PyTorch reference of the ttt-jax ops and layers.

Written independently of `ttt_jax` and never imported by it; only `parity_tests/` sees both.
"""

# Ops (primal form) and their per-sample fast-weight states.
# In-Place TTT (SPEC 3.3): op, state and the SwiGLU layer around it.
from .inplace_ttt import (
    InPlaceMLPConfigRef,
    InPlaceMLPRef,
    InPlaceTTTState,
    inplace_ttt,
    inplace_ttt_materialised,
)

# NPT (SPEC 3.4): factored ops, their materialised twins, and the modulated MLP.
from .npt import (
    NPTMLPConfigRef,
    NPTMLPRef,
    npt_modulated_linear,
    npt_modulated_linear_materialised,
    npt_rank_k_linear,
    npt_rank_k_linear_materialised,
)
from .ttt import TTTLinearState, TTTMLPState, ttt_linear, ttt_mlp

# The layer around the ops.
from .ttt_layer import TTTLayerConfigRef, TTTLayerRef

__all__ = [
    "InPlaceMLPConfigRef",
    "InPlaceMLPRef",
    "InPlaceTTTState",
    "NPTMLPConfigRef",
    "NPTMLPRef",
    "inplace_ttt",
    "inplace_ttt_materialised",
    "npt_modulated_linear",
    "npt_modulated_linear_materialised",
    "npt_rank_k_linear",
    "npt_rank_k_linear_materialised",
    "TTTLayerConfigRef",
    "TTTLayerRef",
    "TTTLinearState",
    "TTTMLPState",
    "ttt_linear",
    "ttt_mlp",
]
