"""Tile math of one TTT-Linear mini-batch, shared by the Pallas forward and backward kernels.

Plain `jnp` on 2-D tiles (rows = the C tokens of a mini-batch, columns = the D features of one
head), so the same code lowers to Triton on a GPU and runs under `interpret=True` on the CPU.
Every tensor has a power-of-two size (a Triton rule); row statistics stay `[C, 1]`.

Notation (SPEC 3.1, `linear.py`): `W [D, D]`, `b [D]` the state at the start of the mini-batch,
`Z = k W + b`, `x = LN-normalised Z` with `r = 1 / sigma`, `y = gamma * (gamma x + beta - t)`
with the target `t = v - k`, and the inner gradient `G = r (y - mean(y) - x mean(x y))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.ttt.common import LN_EPS


def dot(a: jax.Array, b: jax.Array, cd, *, ta: bool = False, tb: bool = False) -> jax.Array:
    """`a @ b` (`a.T` / `b.T` with `ta` / `tb`) on operands cast to `cd`, fp32 accumulation.

    fp32 asks for HIGHEST: the Triton backend maps DEFAULT to TF32, which would break the
    fp32 contract (and parity with the XLA op).
    """
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if jnp.dtype(cd) == jnp.float32 else None
    return lax.dot_general(
        a.astype(cd),
        b.astype(cd),
        dims,
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def dot_wide(a: jax.Array, b: jax.Array, cd, *, ta: bool = False, tb: bool = False) -> jax.Array:
    """`dot` at about fp32 accuracy from compute-dtype MMAs: for the products that the fp32
    state (or its cotangent) accumulates over every mini-batch, where one bf16 rounding per
    step adds up along the whole chain (the TTT-MLP `token_scale` gradient went from 2.3e-2 to
    about 1e-2 relative against the fp32 op).

    Each fp32 operand is split as `hi + lo` (`hi` = its compute-dtype rounding) and the product
    taken as `hi hi + hi lo + lo hi`: three MMAs, two when one operand is already in the
    compute dtype (its `lo` is 0), one plain `dot` under fp32 compute.
    """
    if jnp.dtype(cd) == jnp.float32:
        return dot(a, b, cd, ta=ta, tb=tb)

    def split(x):
        if x.dtype == jnp.dtype(cd):
            return (x,)
        hi = x.astype(cd)
        return hi, (x - hi.astype(x.dtype)).astype(cd)

    (a_hi, *a_lo), (b_hi, *b_lo) = split(a), split(b)
    out = dot(a_hi, b_hi, cd, ta=ta, tb=tb)
    for lo in b_lo:
        out = out + dot(a_hi, lo, cd, ta=ta, tb=tb)
    for lo in a_lo:
        out = out + dot(lo, b_hi, cd, ta=ta, tb=tb)
    return out


def row_mean(x: jax.Array) -> jax.Array:
    """Mean over the feature axis of `[C, D]`, kept as `[C, 1]`."""
    return jnp.sum(x, axis=1, keepdims=True) * (1.0 / x.shape[1])


def ln_stats(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(x, r)`: the normalised rows of `z [C, D]` and `r = rsqrt(var + eps)` as `[C, 1]`."""
    zc = z - row_mean(z)
    r = lax.rsqrt(row_mean(zc * zc) + LN_EPS)
    return zc * r, r


def causal(c: int) -> jax.Array:
    """`[C, C]` bool, `j <= i`."""
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return cols <= rows


def rate_grads(de, ds, eta, a_causal, scale, full, dts):
    """Cotangents of one mini-batch's learning rates (both kernels' backward).

    Args:
      de: `[C, C]` cotangent of `E[i, j] = a_i eta_j` (`a = token_scale`), any values above the
        diagonal (masked here).
      ds: `[C]` cotangent of the update's rates `s = scale * eta`.
      eta: `[C]`; a_causal: `[C, C]` `a_i` where `j <= i`, else 0.
      scale: `a_{C-1}`, or 0 for a trailing partial mini-batch (`full` False).
      dts: `[C]` the running `token_scale` cotangent.

    Returns:
      `(deta [C], dts)`, `dts` plus this mini-batch's share (`a_{C-1}` gets the update's).
    """
    c = eta.shape[0]
    de = jnp.where(causal(c), de, 0.0)
    last = (lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1).astype(jnp.float32)
    deta = jnp.sum(a_causal * de, axis=0) + scale * ds
    dts += jnp.sum(de * eta[None, :], axis=1)
    dts += last * jnp.where(full, jnp.sum(eta * ds), 0.0)
    return deta, dts


def inner_grad(z, t, gamma, beta):
    """LN-L2 inner gradient of one mini-batch and what its backward needs.

    Args:
      z: `[C, D]` fp32 inner-model outputs `k W + b`.
      t: `[C, D]` fp32 targets `v - k`.
      gamma, beta: `[1, D]` fp32 LayerNorm scale and bias.

    Returns:
      `(G, x, r, y, mean(x y))`, the last two `[C, D]` and `[C, 1]`.
    """
    x, r = ln_stats(z)
    y = (x * gamma + beta - t) * gamma
    mxy = row_mean(x * y)
    return (y - row_mean(y) - x * mxy) * r, x, r, y, mxy


def inner_grad_bwd(dg, g, x, r, y, mxy, t, gamma, beta):
    """Backward of `inner_grad` in closed form (`../shared/research/fused_kernels.md`, 1.4).

    `G = r P(y)` with the projector `P = I - 11^T/D - x x^T/D`, which is self-adjoint, so
    `dy = r P(dG)`; `P` also depends on `x` (the `x mean(x y)` term) and `G` is linear in `r`.

    Returns:
      `(dz, dt, dgamma_rows, dbeta_rows)`: `[C, D]` cotangents of z and t, and the `[C, D]`
      per-token terms of the gamma and beta cotangents (the caller sums the rows).
    """
    mxdg = row_mean(x * dg)
    dy = (dg - row_mean(dg) - x * mxdg) * r
    dx = -(dg * mxy + y * mxdg) * r + gamma * gamma * dy
    dr = jnp.sum(dg * g, axis=1, keepdims=True) / r
    # dr/dz = -r^2 x / D: r = (var + eps)^(-1/2) and dvar/dz = 2 (z - mu) / D.
    dz = (dx - row_mean(dx) - x * row_mean(x * dx)) * r - dr * r * r * x * (1.0 / x.shape[1])
    return dz, -gamma * dy, dy * (2.0 * gamma * x + beta - t), gamma * dy


def ln_bwd(dout, x, r, gamma):
    """Backward of `LN(z) = x gamma + beta` w.r.t. z, given `x, r = ln_stats(z)`."""
    gx = dout * gamma
    return (gx - row_mean(gx) - x * row_mean(gx * x)) * r
