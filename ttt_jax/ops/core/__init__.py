"""The machinery every family shares: the checkpointed chunk scan, time chunking, remat
policies, argument checks and the numerics vocabulary. No family imports another family; they
all import from here."""

# --- the chunked scan and its memory knobs
# --- argument checks (ValueErrors that name the argument, before tracing)
from ttt_jax.ops.core.checks import (
    BACKWARDS,
    check_choice,
    check_float,
    check_float_dtype,
    check_optional_positive_int,
    check_positive_int,
    check_shapes,
)
from ttt_jax.ops.core.chunking import merge_time, split_time

# --- numerics: accumulation dtype, matmul, GELU
from ttt_jax.ops.core.numerics import gelu_tanh, gelu_tanh_grad, matmul, wide_dtype
from ttt_jax.ops.core.remat import POLICY_NAMES, resolve_policy
from ttt_jax.ops.core.scan import check_scan_knobs, chunked_scan

__all__ = [
    "BACKWARDS",
    "POLICY_NAMES",
    "check_choice",
    "check_float",
    "check_float_dtype",
    "check_optional_positive_int",
    "check_positive_int",
    "check_scan_knobs",
    "check_shapes",
    "chunked_scan",
    "gelu_tanh",
    "gelu_tanh_grad",
    "matmul",
    "merge_time",
    "resolve_policy",
    "split_time",
    "wide_dtype",
]
