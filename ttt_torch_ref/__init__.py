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

# LaCT (SPEC 3.2): the SwiGLU fast-weight op, its state and the block mixer.
from .lact import LaCTLayerConfigRef, LaCTLayerRef, LaCTState, lact_swiglu

# NPT (SPEC 3.4): factored ops, their materialised twins, the modulated MLP and its block.
from .npt import (
    NPTMLPConfigRef,
    NPTMLPRef,
    npt_generated_rank_k_linear,
    npt_modulated_linear,
    npt_modulated_linear_materialised,
    npt_rank_k_linear,
    npt_rank_k_linear_materialised,
)
from .npt_block import NPTBlockConfigRef, NPTBlockRef
from .ttt import TTTLinearState, TTTMLPState, ttt_linear, ttt_mlp

# The layer around the ops.
from .ttt_layer import TTTLayerConfigRef, TTTLayerRef

__all__ = [
    "InPlaceMLPConfigRef",
    "InPlaceMLPRef",
    "InPlaceTTTState",
    "LaCTLayerConfigRef",
    "LaCTLayerRef",
    "LaCTState",
    "NPTBlockConfigRef",
    "NPTBlockRef",
    "NPTMLPConfigRef",
    "NPTMLPRef",
    "inplace_ttt",
    "inplace_ttt_materialised",
    "lact_swiglu",
    "npt_generated_rank_k_linear",
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
