"""Targets of In-Place TTT (SPEC 3.3): `V = conv(X0) @ W_target`, the conv within each chunk.

The conv is depthwise over time and never crosses a chunk edge (nor, since chunks never cross
documents, a document edge). Two modes: `centered` (kernel 5, padding 2, as in the official
code) and `causal_next` (kernel 2: the token and the next one).

Its VJP is written out (`chunk_conv`): autodiff of the shifted slices keeps one
activation-sized shifted copy per tap for the tap gradients (4 at K=5, ~1 GB at T=32K,
d=2048 in fp32); the custom backward computes the input gradient as the same conv with the taps
reversed (one fused pass) and the tap gradients chunk by chunk, so its temporaries are
chunk-sized.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.core.numerics import matmul, wide_dtype

# Conv taps per mode: "centered" is the official kernel-5 conv (padding 2); "causal_next" sees
# the token and the next one.
CONV_KERNEL_SIZES = {"centered": 5, "causal_next": 2}


def _conv_offset(k: int, conv_mode: str) -> int:
    return k // 2 if conv_mode == "centered" else 0


def _shifted(x: jax.Array, s: int) -> jax.Array:
    """`y[t] = x[t + s]` along axis -2, zero where `t + s` falls outside the chunk."""
    c = x.shape[-2]
    if s == 0:
        return x
    if abs(s) >= c:  # every tap lands outside a chunk this short (C = 1 with kernel 5)
        return jnp.zeros_like(x)
    keep = x[..., s:, :] if s > 0 else x[..., : c + s, :]
    edge = [(0, s)] if s > 0 else [(-s, 0)]
    return jnp.pad(keep, [(0, 0)] * (x.ndim - 2) + edge + [(0, 0)])


def _shift_sum(x: jax.Array, taps: jax.Array, left: int) -> jax.Array:
    """`y[t] = sum_j taps[j] * x[t + j - left]` along axis -2, zero outside, in fp32 (fp64 when
    x or the taps are fp64).

    Written as a sum of padded slices (not slices of one padded copy) so that XLA fuses it
    into a single pass with no activation-sized temporary.
    """
    wd = wide_dtype(x.dtype, taps.dtype)
    x, taps = x.astype(wd), taps.astype(wd)
    taps = taps.reshape((taps.shape[0],) + (1,) * (x.ndim - 1) + (taps.shape[1],))
    return sum(taps[j] * _shifted(x, j - left) for j in range(taps.shape[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def chunk_conv(x: jax.Array, kernel: jax.Array, left: int) -> jax.Array:
    """Depthwise conv within chunks: `x: [..., C, d]`, `kernel: [K, d]` -> `[..., C, d]`,
    `y[t] = sum_j kernel[j] * x[t + j - left]`, zero outside the chunk; fp32 (fp64 for fp64
    operands).

    The custom VJP is explained in the module docstring.
    """
    return _shift_sum(x, kernel, left)


def _chunk_conv_fwd(x, kernel, left):
    return chunk_conv(x, kernel, left), (x, kernel)


def _chunk_conv_bwd(left, res, g):
    x, kernel = res
    k = kernel.shape[0]
    wd = wide_dtype(x.dtype, kernel.dtype)
    taps = kernel.astype(wd)
    dx = _shift_sum(g, taps[::-1], k - 1 - left)
    # The tap gradients reduce shifted copies of x against g; one chunk at a time so that the
    # shifted copies are chunk-sized, not activation-sized.
    xs = x.reshape(-1, *x.shape[-2:])
    gs = g.reshape(-1, *g.shape[-2:])

    def chunk_taps(dk, i):
        x_i = lax.dynamic_index_in_dim(xs, i, keepdims=False).astype(wd)
        g_i = lax.dynamic_index_in_dim(gs, i, keepdims=False)
        return dk + jnp.stack([jnp.sum(g_i * _shifted(x_i, j - left), 0) for j in range(k)]), None

    dk, _ = lax.scan(chunk_taps, jnp.zeros(kernel.shape, wd), jnp.arange(xs.shape[0]))
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


chunk_conv.defvjp(_chunk_conv_fwd, _chunk_conv_bwd)


def chunk_targets(
    x0: jax.Array,
    w_target: jax.Array,
    conv_kernel: jax.Array,
    conv_mode: str,
    compute_dtype,
    *,
    custom_vjp: bool = True,
) -> jax.Array:
    """`V = conv(X0) @ W_target` with the conv zero outside each chunk.

    Args:
      x0: `[..., C, d]` raw targets of whole chunks (the chunk axis is second to last).
      w_target: `[d, d]`, applied as `x @ w_target`.
      conv_kernel: `[K, d]`; `conv(x)[t] = sum_j kernel[j] * x[t + j - off]` with `off = K // 2`
        (centered) or 0 (causal_next).
      conv_mode: `centered` or `causal_next`.
      compute_dtype: dtype of the matmul operands and of the result.
      custom_vjp: use `chunk_conv`'s memory-lean backward (else plain autodiff of the conv).

    Returns:
      `[..., C, d]` in the compute dtype.
    """
    # The conv is a few multiply-adds per element: fp32 (fp64 for fp64 operands) costs
    # nothing and keeps the taps exact before the target projection rounds to the compute
    # dtype.
    left = _conv_offset(conv_kernel.shape[0], conv_mode)
    if custom_vjp:
        conv = chunk_conv(x0, conv_kernel, left)
    else:
        conv = _shift_sum(x0, conv_kernel, left)
    return matmul("...cd,de->...ce", conv, w_target, compute_dtype).astype(compute_dtype)
