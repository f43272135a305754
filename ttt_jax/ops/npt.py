"""NPT: a linear map whose weight changes per token by a low-rank delta (SPEC 3.4).

The per-token weight is `W + Delta W_t` with `Delta W_t = A diag(m_t) B` (rank r) or
`Delta W_t = sum_k u_{t,k}^T w_{t,k}` (rank k, per-token vectors). Forming `Delta W_t` costs
`B * S * d * F` numbers (~344 GiB in fp32 at B=4, S=512, d=4096, F=11008). Associativity gives
the same output through rank-sized intermediates only:

    h_t (W + A diag(m_t) B)          = h_t W + ((h_t A) * m_t) B
    h_t (W + sum_k u_{t,k}^T w_{t,k}) = h_t W + sum_k (h_t . u_{t,k}) w_{t,k}

so the extra activations are `[B, S, r]` (or `[B, S, k]`), and plain autodiff of these lines
keeps nothing bigger than the dense `h W` would. No custom VJP is needed: every cotangent is a
dense matmul of the same shapes as the forward. When the rank-k vectors are themselves linear
in a small code (`u = g W_u`, `w = g W_w`), `npt_generated_rank_k_linear` does not form them
either.

NPT ops have no state (SPEC 2) and return the output alone.
"""

from __future__ import annotations

import jax

from ttt_jax.ops.core.checks import check_float, check_nonempty, check_shapes
from ttt_jax.ops.core.numerics import matmul, wide_dtype


def _add_rounded(base: jax.Array, low: jax.Array, cd) -> jax.Array:
    """`base + low` for the fp32 `[B, S, F]` dense and low-rank products, each first rounded
    to the compute dtype `cd`.

    Summing in fp32 and rounding once is marginally more exact, but XLA then keeps an extra
    `[B, S, F]` buffer alive into the backward: on an H100 (B=4, S=4096, d=4096, F=11008,
    bf16) the MLP peaked at 1.12x the plain MLP's memory; rounding each term first, 1.03x.
    With fp32 compute the two forms are the same.
    """
    return base.astype(cd) + low.astype(cd)


def _dense(h: jax.Array, W: jax.Array, **low: tuple[jax.Array, tuple[str, ...]]) -> jax.Array:
    """Checks an NPT op's arguments before tracing (`h: [B, S, d]`, `W: [d, F]`, and each
    low-rank operand `name=(array, dims)`: shapes, floating dtypes, a non-empty batch and
    sequence), then returns the dense `h W` (fp32 accumulation, compute dtype of h)."""
    specs = [("h", h, ("B", "S", "d")), ("W", W, ("d", "F"))]
    specs += [(name, x, dims) for name, (x, dims) in low.items()]
    check_shapes(specs)
    check_float(**{name: x for name, x, _ in specs})
    check_nonempty("h", h, ("B", "S"))
    return matmul("bsd,df->bsf", h, W, h.dtype)


def npt_modulated_linear(
    h: jax.Array, m: jax.Array, *, W: jax.Array, A: jax.Array, B: jax.Array
) -> jax.Array:
    """`y_t = h_t W + ((h_t A) * m_t) B`, i.e. `h_t (W + A diag(m_t) B)` without `Delta W_t`.

    Args:
      h: `[B, S, d]` inputs; their dtype is the compute dtype of every matmul (bf16 or fp32),
        accumulation is fp32.
      m: `[B, S, r]` per-token modulation (`s * tanh(a_t A_m)` in the NPT layer); applied in
        fp32 (fp64 when h or m is fp64) to the rank-r projection `h A`.
      W: `[d, F]` the static weight.
      A: `[d, r]` left low-rank factor.
      B: `[r, F]` right low-rank factor.

    Returns:
      `y: [B, S, F]` in the dtype of h.

    Raises:
      ValueError: before tracing, naming the argument whose shape disagrees (rank r between
        A, B and m; d between h, W and A; F between W and B; B, S between h and m).
    """
    base = _dense(h, W, A=(A, ("d", "r")), B=(B, ("r", "F")), m=(m, ("B", "S", "r")))
    cd = h.dtype
    # h A is only r wide: keep it and the modulation in fp32 (fp64 for fp64 operands); only
    # the F-wide matmul with B goes back to the compute dtype, where it runs at the speed of
    # the dense one.
    low = matmul("bsd,dr->bsr", h, A, cd) * m.astype(wide_dtype(cd, m.dtype))
    return _add_rounded(base, matmul("bsr,rf->bsf", low, B, cd), cd)


def npt_rank_k_linear(h: jax.Array, u: jax.Array, w: jax.Array, *, W: jax.Array) -> jax.Array:
    """`y_t = h_t W + sum_k (h_t . u_{t,k}) w_{t,k}` without forming `sum_k u_{t,k}^T w_{t,k}`.

    Args:
      h: `[B, S, d]` inputs; their dtype is the compute dtype (fp32 accumulation).
      u: `[B, S, k, d]` per-token left vectors.
      w: `[B, S, k, F]` per-token right vectors.
      W: `[d, F]` the static weight.

    Returns:
      `y: [B, S, F]` in the dtype of h.

    Raises:
      ValueError: before tracing, naming the argument whose shape disagrees.
    """
    base = _dense(h, W, u=(u, ("B", "S", "k", "d")), w=(w, ("B", "S", "k", "F")))
    cd = h.dtype
    coef = matmul("bsd,bskd->bsk", h, u, cd)  # [B, S, k] fp32, as h A above
    return _add_rounded(base, matmul("bsk,bskf->bsf", coef, w, cd), cd)


def npt_generated_rank_k_linear(
    h: jax.Array, g: jax.Array, *, W: jax.Array, W_u: jax.Array, W_w: jax.Array
) -> jax.Array:
    """The rank-k form with linearly generated vectors, without forming them.

    With `u_{t,k} = g_t W_u[:, k]` and `w_{t,k} = g_t W_w[:, k]` (the NPT layer's generator,
    `g_t = a_t W_gen`), `y_t = h_t W + sum_k (h_t . u_{t,k}) w_{t,k}` regroups as

        c_{t,k}  = sum_i g_{t,i} (h_t . W_u[i, k])            ([k], from h_t W_u^T: [r, k])
        y_t      = h_t W + sum_{i,k} (c_{t,k} g_{t,i}) W_w[i, k]

    so the per-token activations are `[r, k]` wide instead of `k (d + F)`: it equals
    `npt_rank_k_linear(h, g W_u, g W_w, W=W)` with the same flops and none of the
    `[B, S, k, d]` / `[B, S, k, F]` vectors or their cotangents.

    Args:
      h: `[B, S, d]` inputs; their dtype is the compute dtype (fp32 accumulation).
      g: `[B, S, r]` per-token generator code.
      W: `[d, F]` the static weight.
      W_u: `[r, k, d]` generator of the left vectors.
      W_w: `[r, k, F]` generator of the right vectors.

    Returns:
      `y: [B, S, F]` in the dtype of h.

    Raises:
      ValueError: before tracing, naming the argument whose shape disagrees.
    """
    base = _dense(
        h, W, g=(g, ("B", "S", "r")), W_u=(W_u, ("r", "k", "d")), W_w=(W_w, ("r", "k", "F"))
    )
    cd = h.dtype
    r, k = W_u.shape[:2]
    wd = wide_dtype(cd, g.dtype)
    gw = g.astype(wd)
    proj = matmul("bsd,ikd->bsik", h, W_u, cd)  # [B, S, r, k]: h_t . W_u[i, k]
    # r * k numbers per token: fp32 (HIGHEST, so GPUs do not drop to TF32; fp64 for fp64
    # operands) costs nothing.
    coef = matmul("bsi,bsik->bsk", gw, proj, wd)
    outer = (gw[..., :, None] * coef[..., None, :]).reshape(*g.shape[:2], r * k)
    low = matmul("bsj,jf->bsf", outer, W_w.reshape(r * k, W_w.shape[-1]), cd)
    return _add_rounded(base, low, cd)
