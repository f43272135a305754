"""The memory-lean custom VJP of In-Place TTT's exclusive prefix (`backward="custom"`).

The math and notation are in `prefix.py`. Autodiff of the sequential scan would keep the
carried state of every slot, `n x [B, d, F]`, the very per-chunk weights In-Place TTT must never
materialise. This VJP keeps only its inputs (`z`, `v`, the state entering slot 0) and runs two
scans that each carry one `[B, d, F]` matrix:

1. forward again, rebuilding the state `X_j` each slot reads: `dZr_j = dO_j X_j`;
2. in reverse, carrying `R_j = dL/dX_{j+1}`, the cotangent of the state after slot j's
   update: the final state's cotangent plus `sum dO_i^T Zr_i` over the reads that come later
   (cut at a reset). Then `dDelta_j = eta R_j`, `dZd_j = V_j dDelta_j`, `dV_j = Zd_j
   dDelta_j^T`, `deta += <R_j, Delta_j>`, and `R_{j-1} = keep_j R_j + dO_j^T Zr_j`.

Reading `X_j` back by subtracting deltas from the final state would save scan 1 but cannot
undo a reset and drifts by rounding, so scan 1 recomputes it exactly. Cost per slot: 5
`C x d x F` matmuls in the backward (6 with clipping) against 4 for autodiff.

Every per-token array stays `[B, T, ...]`: tokens are fetched slot by slot (a dynamic slice, or
a gather for packed documents) and cotangents are added into one carried buffer in place, so
the only activation-sized temporaries are the cotangents themselves. The forward is the same
loop with the output as the carried buffer (or the associative form, `prefix="associative"`).

Speed: per slot the `[B, d, F]` fp32 state is as many bytes as the matmuls' inputs, so its
traffic counts. The loops carry the state's compute-dtype copy beside it (made in the same pass
as the update) so that the state's only reader is the update, which XLA can then fold into the
delta matmul as an accumulating GEMM (`slot_update` scales V by eta for that reason).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.core.numerics import matmul, wide_dtype
from ttt_jax.ops.core.scan import chunked_scan
from ttt_jax.ops.inplace.prefix import (
    PrefixConfig,
    add_at,
    assemble,
    associative_reads,
    base_term,
    clip_scale,
    keep_of,
    last_rows,
    plain_reads,
    slot_idx,
    slot_update,
    take,
)


def _read_copy(x, cfg):
    """The state as the read matmul takes it; None when that is the state itself."""
    return None if cfg.compute_dtype == cfg.state_dtype else x.astype(cfg.compute_dtype)


def _sequential_inplace(x0, eta, z, v, w_base, keep, delta_idx, read_idx, last_idx, n, cfg):
    """The forward as one loop writing the output buffer in place (nothing differentiated)."""
    c, cd = cfg.chunk_size, cfg.compute_dtype

    def step(carry, j):
        x, x_cd, o = carry
        zd_j = take(z, slot_idx(delta_idx, j, c), j * c, c)
        zr_j = zd_j if read_idx is None else take(z, slot_idx(read_idx, j, c), j * c, c)
        read = matmul("bcf,bdf->bcd", zr_j, x if x_cd is None else x_cd, cd)
        o = add_at(o, slot_idx(read_idx, j, c), j * c, read)
        v_j = lax.dynamic_slice_in_dim(v, j * c, c, axis=1)
        x = slot_update(x, eta, zd_j, v_j, keep_of(keep, j), cfg)
        return (x, _read_copy(x, cfg), o), None

    x, o = x0, base_term(z, w_base, x0.shape[1], cfg)
    if n:
        carry = (x, _read_copy(x, cfg), o)
        (x, _, o), _ = chunked_scan(step, carry, jnp.arange(n), unroll=cfg.unroll)
    return assemble(None, x, z, None, None, last_idx, n, cfg, o=o), x


def _forward(x0, eta, z, v, w_base, keep, delta_idx, read_idx, last_idx, n, cfg):
    if cfg.prefix == "associative" and n:
        o_slots, x = associative_reads(x0, eta, z, v, keep, delta_idx, read_idx, n, cfg)
        return assemble(o_slots, x, z, w_base, read_idx, last_idx, n, cfg), x
    return _sequential_inplace(x0, eta, z, v, w_base, keep, delta_idx, read_idx, last_idx, n, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _custom(x0, eta, z, v, w_base, keep, delta_idx, read_idx, last_idx, n, cfg):
    return _forward(x0, eta, z, v, w_base, keep, delta_idx, read_idx, last_idx, n, cfg)


def _custom_fwd(x0, eta, z, v, w_base, keep, delta_idx, read_idx, last_idx, n, cfg):
    out = _forward(x0, eta, z, v, w_base, keep, delta_idx, read_idx, last_idx, n, cfg)
    return out, (x0, eta, z, v, w_base, keep, delta_idx, read_idx, last_idx)


def _custom_bwd(n, cfg, res, cts):
    x0, eta, z, v, w_base, keep, delta_idx, read_idx, last_idx = res
    g_o, g_x = cts
    c, cd = cfg.chunk_size, cfg.compute_dtype
    # One cotangent buffer for z, carried through both scans and updated in place.
    if w_base is None:
        dz, dw_base = jnp.zeros_like(z), None
    else:
        dz = matmul("btd,df->btf", g_o, w_base, cd).astype(z.dtype)
        dw_base = matmul("btd,btf->df", g_o, z, cd).astype(w_base.dtype)

    def reader(j):
        return slot_idx(read_idx, j, c)

    # Scan 1, forward: rebuild the state each slot reads and pull dO back through the read.
    def read_grad(carry, j):
        x, x_cd, dz = carry
        g_j = take(g_o, reader(j), j * c, c)
        dzr_j = matmul("bcd,bdf->bcf", g_j, x if x_cd is None else x_cd, cd)
        dz = add_at(dz, reader(j), j * c, dzr_j)
        zd_j = take(z, slot_idx(delta_idx, j, c), j * c, c)
        v_j = lax.dynamic_slice_in_dim(v, j * c, c, axis=1)
        x = slot_update(x, eta, zd_j, v_j, keep_of(keep, j), cfg)
        return (x, _read_copy(x, cfg), dz), None

    x = x0
    if n:
        (x, _, dz), _ = lax.scan(
            read_grad, (x, _read_copy(x, cfg), dz), jnp.arange(n), unroll=cfg.unroll
        )

    # The running sums accumulate in fp32, fp64 when the compute or the state dtype is (a
    # float32 carry would change type against fp64 matmul results inside the scan).
    acc = wide_dtype(cd, cfg.state_dtype)
    r = g_x.astype(acc)
    start, length = last_rows(z, last_idx, n, c)
    if length:
        g_last, z_last = take(g_o, last_idx, start, length), take(z, last_idx, start, length)
        dz = add_at(dz, last_idx, start, matmul("btd,bdf->btf", g_last, x, cd))
        r = r + matmul("btd,btf->bdf", g_last, z_last, cd)

    # Scan 2, reverse: R = dL/d(state after slot j), one [B, d, F] running sum.
    def delta_grad(carry, j):
        r, deta, dz, dv = carry
        zd_j = take(z, slot_idx(delta_idx, j, c), j * c, c)
        v_j = lax.dynamic_slice_in_dim(v, j * c, c, axis=1)
        if cfg.clip_tau is None:
            # <R, V^T Z> = sum(Z * (V R)): the V R product that gives dZd gives deta too.
            vr = matmul("bcd,bdf->bcf", v_j, r, cd)
            deta = deta + jnp.sum(vr * zd_j.astype(acc))
            dzd_j, dv_j = eta * vr, eta * matmul("bcf,bdf->bcd", zd_j, r, cd)
        else:
            raw = matmul("bcd,bcf->bdf", v_j, zd_j, cd)
            sq = jnp.sum(raw * raw, axis=(1, 2))
            scale, big = clip_scale(sq, cfg.clip_tau)
            deta = deta + jnp.sum(scale * jnp.sum(r * raw, axis=(1, 2)))
            g_delta = eta * r
            # d/dD of scale(D) * D: scale * G - [clipped] scale / ||D||^2 * <G, D> * D.
            coef = jnp.where(big, scale / jnp.where(big, sq, 1.0), 0.0)
            coef = coef * jnp.sum(g_delta * raw, axis=(1, 2))
            g_raw = scale[:, None, None] * g_delta - coef[:, None, None] * raw
            dzd_j = matmul("bcd,bdf->bcf", v_j, g_raw, cd)
            dv_j = matmul("bcf,bdf->bcd", zd_j, g_raw, cd)
        dz = add_at(dz, slot_idx(delta_idx, j, c), j * c, dzd_j)
        dv = lax.dynamic_update_slice_in_dim(dv, dv_j.astype(dv.dtype), j * c, axis=1)
        keep_j = keep_of(keep, j)
        r = r if keep_j is None else r * keep_j[:, None, None].astype(r.dtype)
        zr_j = zd_j if read_idx is None else take(z, reader(j), j * c, c)
        r = r + matmul("bcd,bcf->bdf", take(g_o, reader(j), j * c, c), zr_j, cd)
        return (r, deta, dz, dv), None

    deta, dv = jnp.zeros((), acc), jnp.zeros_like(v)
    if n:
        (r, deta, dz, dv), _ = lax.scan(
            delta_grad, (r, deta, dz, dv), jnp.arange(n), reverse=True, unroll=cfg.unroll
        )
    return (
        r.astype(x0.dtype),
        deta.astype(eta.dtype),
        dz,
        dv,
        dw_base,
        None if keep is None else jnp.zeros_like(keep),
        None,
        None,
        None,
    )


_custom.defvjp(_custom_fwd, _custom_bwd)


def fast_weight_reads(
    x0: jax.Array,
    eta: jax.Array,
    z: jax.Array,
    v: jax.Array,
    *,
    n: int,
    cfg: PrefixConfig,
    w_base: jax.Array | None = None,
    keep: jax.Array | None = None,
    delta_idx: jax.Array | None = None,
    read_idx: jax.Array | None = None,
    last_idx: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Every token's read of the fast weight over `n` slots of C tokens (`prefix.py`).

    Args:
      x0: `[B, d, F]` state entering slot 0 (state dtype).
      eta: `[]` learning rate (state dtype).
      z: `[B, T, F]` tokens (compute dtype).
      v: `[B, n C, d]` targets of each slot's delta tokens (compute dtype).
      n: number of slots (complete chunks), >= 0.
      cfg: static settings.
      w_base: `[d, F]`: adds `Z W_base^T` at every token; None: no base term.
      keep: `[B, n]`, 0 where the state resets before slot j's delta, else 1; None: never.
      delta_idx: `[B, n C]` int positions in z of each slot's delta tokens (`>= T`: padding,
        zero); None: slot j is tokens `[j C, (j + 1) C)`.
      read_idx: `[B, n C]` positions of the tokens reading the state entering each slot
        (`>= T`: nobody); None: the delta tokens.
      last_idx: `[B, L]` positions of the tokens reading the state after the last slot; None:
        tokens `[n C, T)`.

    Returns:
      `o: [B, T, d]` fp32 (zero at tokens that neither read nor have a base), and the state
      after the last slot.
    """
    args = (x0, eta, z, v, w_base, keep, delta_idx, read_idx, last_idx, n, cfg)
    if cfg.backward == "custom":
        return _custom(*args)
    return plain_reads(*args)
