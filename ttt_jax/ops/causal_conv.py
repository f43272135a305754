"""Causal depthwise 1-D convolution over time, with an explicit carried history for streaming."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_conv(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, history: jax.Array | None = None
) -> jax.Array:
    """`y[t] = bias + sum_j weight[j] * x[t - (K-1) + j]`, per channel.

    Args:
      x: `[B, T, C]`.
      weight: `[K, C]` taps, the last one multiplying the current step.
      bias: `[C]` or None.
      history: `[B, K-1, C]` inputs before `x[:, 0]` (a streaming call's carried tail); zeros
        when None, i.e. the sequence starts here.

    Returns:
      `[B, T, C]` in the dtype of x (accumulated in fp32).
    """
    k = weight.shape[0]
    b, t, c = x.shape
    if history is None:
        history = jnp.zeros((b, k - 1, c), x.dtype)
    xp = jnp.concatenate([history.astype(x.dtype), x], axis=1).astype(jnp.float32)
    w = weight.astype(jnp.float32)
    y = sum(w[j] * xp[:, j : j + t] for j in range(k))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
