"""The numerics vocabulary every op and layer shares: the accumulation dtype, the matmul with
explicit accumulation and precision, and the tanh-approximate GELU with its derivative."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

_GELU_C = math.sqrt(2.0 / math.pi)


def wide_dtype(dtype) -> jnp.dtype:
    """fp32 for bf16 / fp16 / fp32, fp64 for fp64 (tests under `jax_enable_x64`): the dtype of
    accumulations, norms and state. Not `jnp.promote_types`: under the strict promotion the
    tests run with, bf16 and fp32 have no implicit promotion."""
    return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32)


def matmul(spec: str, a: jax.Array, b: jax.Array, compute_dtype) -> jax.Array:
    """`einsum` with operands in the compute dtype and fp32 accumulation and result.

    fp64 operands (tests under `jax_enable_x64`) accumulate and return fp64.

    fp32 inputs ask for HIGHEST precision so that GPUs do not silently drop to TF32 and parity
    with the reference holds; bf16 inputs take the fast path.
    """
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    return jnp.einsum(
        spec,
        a.astype(compute_dtype),
        b.astype(compute_dtype),
        preferred_element_type=wide_dtype(compute_dtype),
        precision=precision,
    )


def gelu_tanh(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jnp.tanh(_GELU_C * (x + 0.044715 * x**3)))


def gelu_tanh_grad(x: jax.Array) -> jax.Array:
    """d gelu_tanh / dx, written out because the dual form needs it as a value, not a VJP."""
    t = jnp.tanh(_GELU_C * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
