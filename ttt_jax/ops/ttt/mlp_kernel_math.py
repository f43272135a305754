"""Tile math of one TTT-MLP mini-batch, shared by the Pallas forward and backward kernels.

Plain `jnp` on 2-D tiles, as `kernel_math` (whose `dot`, LayerNorm and LN-L2 helpers it uses):
rows are the C tokens of a mini-batch, columns the D features or a block of `BF` of the F
hidden units. The hidden axis is cut into `F / BF` blocks (a static Python loop, so no tile is
ever sliced: Triton has no dynamic slicing of register tiles); the caller hands the state in as
`w(j) -> (W1[:, block j], W2[block j, :])`, which either returns loop-carry values or loads the
block from HBM (`mlp_kernel_fwd.HbmState`), so only that block need be live.

Notation (SPEC 3.1, `mlp.py`): per mini-batch with start state `W1 [D, F], b1 [F], W2 [F, D],
b2 [D]`, `Z1 = k W1 + b1`, `X2 = gelu(Z1)`, `Z2 = X2 W2 + b2`, `G2` the LN-L2 gradient of `Z2`
against `t = v - k`, `H = G2 W2^T`, `G1 = H * gelu'(Z1)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ttt_jax.ops.core.numerics import gelu_tanh, gelu_tanh_grad
from ttt_jax.ops.ttt import kernel_math as km

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


def gelu_tanh_grad2(x: jax.Array) -> jax.Array:
    """Second derivative of `gelu_tanh`.

    With `u = c (x + a x^3)`, `th = tanh(u)`: `gelu' = (1 + th) / 2 + x (1 - th^2) u' / 2`, so
    `gelu'' = (1 - th^2) (u' - x th u'^2 + x u'' / 2)` with `u' = c (1 + 3 a x^2)`,
    `u'' = 6 a c x`.
    """
    th = jnp.tanh(_C * (x + _A * x**3))
    du = _C * (1.0 + 3.0 * _A * x * x)
    return (1.0 - th * th) * (du - x * th * du * du + 0.5 * x * (6.0 * _A * _C) * x)


def pass_a(k, t, w, b1s, b2, gamma, beta, cd, n_blocks):
    """The inner model on the keys and its LN-L2 gradient.

    Args:
      k: `[C, D]` keys (compute dtype); t: `[C, D]` fp32 targets `v - k`.
      w: `j -> (W1_j [D, BF], W2_j [BF, D])` the state's blocks (any float dtype).
      b1s: the `[BF]` fp32 blocks of b1; b2: `[D]` fp32.
      gamma, beta: `[1, D]` fp32 LayerNorm scale and bias.

    Returns:
      `(Z1 blocks, X2 blocks, (G2, x, r, y, mean(x y)))`, the last as `km.inner_grad`.
    """
    z1s, x2s = [], []
    z2 = b2[None, :]
    for j in range(n_blocks):
        w1, w2 = w(j)
        z1 = km.dot(k, w1, cd) + b1s[j][None, :]
        x2 = gelu_tanh(z1)
        z2 = z2 + km.dot(x2, w2, cd)
        z1s.append(z1)
        x2s.append(x2)
    return z1s, x2s, km.inner_grad(z2, t, gamma, beta)


def hidden_grad(g2, z1, w2, cd):
    """`(H, gelu'(Z1), G1)` of one hidden block: `H = G2 W2_j^T`, `G1 = H * gelu'(Z1)`."""
    h = km.dot(g2, w2, cd, tb=True)
    gp = gelu_tanh_grad(z1)
    return h, gp, h * gp


def read_block(q, attn1, g1, w1, b1, x2, w2, cd):
    """One hidden block's share of the dual-form read.

    `Z1_bar = q W1_j + b1_j - attn1 G1_j` and `X2_bar = gelu(Z1_bar)`; returns
    `(Z1_bar, X2_bar, X2_bar X2_j^T [C, C], X2_bar W2_j [C, D])`, the last two summed over the
    blocks by the caller into `attn2 = E * (X2_bar X2^T + 1)` and `Z2_bar`.
    """
    z1b = km.dot(q, w1, cd) + b1[None, :] - km.dot(attn1, g1, cd)
    x2b = gelu_tanh(z1b)
    return z1b, x2b, km.dot(x2b, x2, cd, tb=True), km.dot(x2b, w2, cd)
