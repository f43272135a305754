"""Pure-JAX ops: `op(..., initial_state=None, ...) -> (out, final_state)` on `[B, T, H, D]`."""

# --- the shared scan machinery
from ttt_jax.ops.core import POLICY_NAMES, chunked_scan, resolve_policy

# --- In-Place TTT (SPEC 3.3)
from ttt_jax.ops.inplace import InPlaceState, inplace_ttt

# --- LaCT large-chunk SwiGLU fast weights (SPEC 3.2)
from ttt_jax.ops.lact import LaCTState, lact_low_rank_weight, lact_swiglu

# --- NPT per-token low-rank modulation (SPEC 3.4)
from ttt_jax.ops.npt import (
    npt_generated_rank_k_linear,
    npt_modulated_linear,
    npt_rank_k_linear,
)

# --- TTT-Linear / TTT-MLP (SPEC 3.1)
from ttt_jax.ops.ttt import (
    TTTLinearState,
    TTTMLPState,
    ttt_linear,
    ttt_linear_primal,
    ttt_mlp,
    ttt_mlp_primal,
)

__all__ = [
    "InPlaceState",
    "LaCTState",
    "POLICY_NAMES",
    "TTTLinearState",
    "TTTMLPState",
    "chunked_scan",
    "inplace_ttt",
    "lact_low_rank_weight",
    "lact_swiglu",
    "npt_generated_rank_k_linear",
    "npt_modulated_linear",
    "npt_rank_k_linear",
    "resolve_policy",
    "ttt_linear",
    "ttt_linear_primal",
    "ttt_mlp",
    "ttt_mlp_primal",
]
