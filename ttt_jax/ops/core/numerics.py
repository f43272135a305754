"""The numerics vocabulary every op and layer shares: the accumulation dtype, the matmul with
explicit accumulation and precision, the two norms and the tanh-approximate GELU with its
derivative.

The norms take their computation dtype as an argument rather than deciding it: the TTT ops
normalise in whatever dtype the inner loop runs in (fp32 under bf16 inputs, fp64 under fp64),
while a layer's output norms compute in fp32 whatever the compute dtype (SPEC 4: norms stay
fp32), so the same function serves both without either changing its rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

_GELU_C = math.sqrt(2.0 / math.pi)


def wide_dtype(*dtypes) -> jnp.dtype:
    """fp32 for bf16 / fp16 / fp32, fp64 for fp64 (tests under `jax_enable_x64`): the dtype of
    accumulations, norms and state. Given several dtypes (e.g. the inputs' and `state_dtype`),
    the wider: fp64 if any is fp64, else fp32 (SPEC 2). Not `jnp.promote_types`: under the
    strict promotion the tests run with, bf16 and fp32 have no implicit promotion."""
    wide = any(jnp.dtype(d) == jnp.float64 for d in dtypes)
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def matmul(spec: str, a: jax.Array, b: jax.Array, compute_dtype) -> jax.Array:
    """`einsum` with operands in the compute dtype and fp32 accumulation and result.

    fp64 operands (tests under `jax_enable_x64`) accumulate and return fp64. The result stays
    in the accumulation dtype; a caller that stores it as an activation rounds it back to the
    compute dtype itself (`.astype(compute_dtype)`), which is what halves activation memory
    under bf16.

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


def layer_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float, dtype=None
) -> jax.Array:
    """LayerNorm over the last axis: `(x - mean) / sqrt(var + eps) * scale + bias`.

    Args:
      x: `[..., D]`.
      scale, bias: broadcastable against x (`[D]`, or e.g. `[H, 1, D]` for per-head norms of
        `[B, H, C, D]`; the caller lays them out).
      eps: added to the variance.
      dtype: the dtype x, scale and bias are cast to and the result is returned in; None
        computes in the dtype the arguments already have (no cast).
    """
    if dtype is not None:
        x, scale, bias = x.astype(dtype), scale.astype(dtype), bias.astype(dtype)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + eps) * scale + bias


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm over the last axis, computed and returned in fp32 (fp64 for fp64 x)."""
    dtype = wide_dtype(x.dtype)
    x = x.astype(dtype)
    return x * lax.rsqrt((x * x).mean(-1, keepdims=True) + eps) * scale.astype(dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """`0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, in the dtype of x."""
    return 0.5 * x * (1.0 + jnp.tanh(_GELU_C * (x + 0.044715 * x**3)))


def gelu_tanh_grad(x: jax.Array) -> jax.Array:
    """d gelu_tanh / dx, written out because the dual form needs it as a value, not a VJP."""
    t = jnp.tanh(_GELU_C * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
