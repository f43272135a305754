"""Pure-JAX ops: `op(..., initial_state=None, ...) -> (out, final_state)` on `[B, T, H, D]`.

One subpackage per family (`ttt`, `lact`, `inplace`), a module where a family is one file
(`npt`, and the layers' shared pieces `rope` and `causal_conv`), and `core`, the machinery they
share. Layers import from this index, from `ttt_jax.ops.core` or from a family's own index (a
subpackage's `__init__`, or the module of a one-file family), never a family's inner files.
"""

# isort: skip_file
# (The banners follow SPEC 3's order; isort would sort the imports across them.)

# --- the shared scan machinery (SPEC 4)
from ttt_jax.ops.core import POLICY_NAMES, chunked_scan, resolve_policy

# --- TTT-Linear / TTT-MLP (SPEC 3.1)
from ttt_jax.ops.ttt import (
    TTTLinearState,
    TTTMLPState,
    ttt_linear,
    ttt_linear_primal,
    ttt_mlp,
    ttt_mlp_primal,
)

# --- LaCT large-chunk SwiGLU fast weights (SPEC 3.2)
from ttt_jax.ops.lact import LaCTState, lact_low_rank_weight, lact_swiglu

# --- In-Place TTT (SPEC 3.3)
from ttt_jax.ops.inplace import InPlaceState, inplace_ttt

# --- NPT per-token low-rank modulation (SPEC 3.4)
from ttt_jax.ops.npt import (
    npt_generated_rank_k_linear,
    npt_modulated_linear,
    npt_rank_k_linear,
)

__all__ = [
    # the shared scan machinery
    "POLICY_NAMES",
    "chunked_scan",
    "resolve_policy",
    # TTT-Linear / TTT-MLP
    "TTTLinearState",
    "TTTMLPState",
    "ttt_linear",
    "ttt_linear_primal",
    "ttt_mlp",
    "ttt_mlp_primal",
    # LaCT
    "LaCTState",
    "lact_low_rank_weight",
    "lact_swiglu",
    # In-Place TTT
    "InPlaceState",
    "inplace_ttt",
    # NPT
    "npt_generated_rank_k_linear",
    "npt_modulated_linear",
    "npt_rank_k_linear",
]
