"""Rotary position embedding on `[B, T, H, D]`, interleaved pairs `(x[2i], x[2i+1])`.

Pair i turns at the frequency `theta^(-2i/D)`, or at frequencies given explicitly
(`inv_freq`, e.g. Llama 3's scaled ones from `llama3_inv_freq`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.ops.core.checks import check_finite_number
from ttt_jax.ops.core.numerics import wide_dtype


def rope(
    x: jax.Array,
    positions: jax.Array,
    theta: float = 10000.0,
    *,
    inv_freq: np.ndarray | None = None,
) -> jax.Array:
    """Rotates each pair `(x[..., 2i], x[..., 2i+1])` by `positions * theta^(-2i/D)`.

    Args:
      x: `[B, T, H, D]`, D even.
      positions: `[T]` or `[B, T]` integer or float positions.
      theta: the RoPE base.
      inv_freq: `[D/2]` frequencies to use instead of `theta^(-2i/D)` (theta is then unused).

    Returns:
      `[B, T, H, D]` in the dtype of x (angles and products in fp32, fp64 for fp64 x).
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rope needs an even head dim, got x shape {x.shape}")
    check_finite_number("theta", theta, positive=True, allow_array=True)
    wd = wide_dtype(x.dtype)
    if inv_freq is None:
        inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=wd) / d)  # [D/2]
    else:
        if np.shape(inv_freq) != (d // 2,):
            raise ValueError(f"inv_freq must be [D/2] = [{d // 2}], got shape {np.shape(inv_freq)}")
        inv_freq = jnp.asarray(inv_freq, wd)
    pos = jnp.asarray(positions, wd)
    if pos.ndim == 1:
        pos = pos[None]
    angle = pos[:, :, None, None] * inv_freq  # [B|1, T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(wd).reshape(*x.shape[:-1], d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def llama3_inv_freq(
    head_dim: int,
    theta: float,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_positions: int,
) -> np.ndarray:
    """Llama 3.1's RoPE frequencies (`rope_scaling` type "llama3"): `[head_dim / 2]` float32.

    With `f_i = theta^(-2i/D)` and wavelength `w_i = 2 pi / f_i`: frequencies of wavelength
    below `original / high_freq_factor` stay, those above `original / low_freq_factor` are
    divided by `factor`, and those between are interpolated linearly in
    `s = (original / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor)`:
    `(1 - s) f_i / factor + s f_i`.

    Computed once on the host in float32, the precision the checkpoints were trained with.
    """
    if not high_freq_factor > low_freq_factor > 0:
        raise ValueError(
            f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor > 0, got "
            f"{high_freq_factor} and {low_freq_factor}"
        )
    inv = 1.0 / (
        np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    )
    wavelen = 2 * math.pi / inv
    low_wavelen = original_max_positions / low_freq_factor
    high_wavelen = original_max_positions / high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original_max_positions / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, mid, scaled).astype(np.float32)
