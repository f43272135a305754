"""Rotary position embedding on `[B, T, H, D]`, interleaved pairs `(x[2i], x[2i+1])`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttt_jax.ops.core.checks import check_finite_number
from ttt_jax.ops.core.numerics import wide_dtype


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotates each pair `(x[..., 2i], x[..., 2i+1])` by `positions * theta^(-2i/D)`.

    Args:
      x: `[B, T, H, D]`, D even.
      positions: `[T]` or `[B, T]` integer or float positions.
      theta: the RoPE base.

    Returns:
      `[B, T, H, D]` in the dtype of x (angles and products in fp32, fp64 for fp64 x).
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rope needs an even head dim, got x shape {x.shape}")
    check_finite_number("theta", theta, positive=True, allow_array=True)
    wd = wide_dtype(x.dtype)
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=wd) / d)  # [D/2]
    pos = jnp.asarray(positions, wd)
    if pos.ndim == 1:
        pos = pos[None]
    angle = pos[:, :, None, None] * inv_freq  # [B|1, T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(wd).reshape(*x.shape[:-1], d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
