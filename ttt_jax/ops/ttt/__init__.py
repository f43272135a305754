"""TTT-Linear and TTT-MLP (SPEC 3.1): dual-form ops and their token-serial primal twins."""

from ttt_jax.ops.ttt.kernel_common import IMPLS
from ttt_jax.ops.ttt.linear import NAMES, TTTLinearState, ttt_linear
from ttt_jax.ops.ttt.linear_kernel import resolve_impl
from ttt_jax.ops.ttt.mlp import TTTMLPState, ttt_mlp
from ttt_jax.ops.ttt.mlp_kernel import resolve_impl as resolve_mlp_impl
from ttt_jax.ops.ttt.primal import ttt_linear_primal, ttt_mlp_primal

__all__ = [
    "IMPLS",
    "NAMES",
    "TTTLinearState",
    "TTTMLPState",
    "ttt_linear",
    "ttt_linear_primal",
    "ttt_mlp",
    "ttt_mlp_primal",
    "resolve_impl",
    "resolve_mlp_impl",
]
