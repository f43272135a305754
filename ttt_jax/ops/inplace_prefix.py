"""The exclusive prefix of In-Place TTT (SPEC 3.3) and its memory-lean backward.

This module sees the problem after the sequence has been laid out as `N` *slots* of `C` tokens
(one complete chunk each, see `inplace_ttt.py`). Per sample, with the fast weight `X` carried
across slots (`[d, F]`, in the state dtype):

    o_j   = Zr_j X_j^T                               read: the state *before* slot j
    X_j+1 = keep_j * X_j + eta * clip(V_j^T Zd_j)    update: slot j's delta, after its read

`Zd_j, V_j` are the slot's tokens and targets (`[C, F]`, `[C, d]`), `Zr_j` the tokens that read
the state entering slot j (the slot's own tokens, or other tokens when documents are packed) and
`keep_j` is 0 where a new document starts (the state resets). Because every slot reads the state
from *before* its own update, the prefix is exclusive: chunk j never sees itself.

Two forwards compute this (`prefix=`):

- `sequential`: a scan over slots carrying one `[B, d, F]` state (the shared `chunked_scan`).
- `associative`: all deltas `[N, B, d, F]` at once and `lax.associative_scan` over them, the
  parallel form that shards over the slot axis (context parallelism). It *does* materialise
  per-slot states in its forward, several `[N, B, d, F]` arrays: faster on wide devices, not
  memory-lean. That is its nature, not an accident.

Two backwards (`backward=`):

- `autodiff`: JAX differentiates the chosen forward. The sequential scan then stores the
  carried state of every slot (`[N, B, d, F]`, fewer with `checkpoint_group`), the associative
  form its prefix sums.
- `custom`: a `jax.custom_vjp` that saves only its inputs (activation-sized) and runs two scans
  that each carry one `[B, d, F]` matrix:
    1. forward again, rebuilding `X_j` to form `dZr_j = dO_j X_j`;
    2. in reverse, carrying `R_j = dL/dX_j+1 = sum of dO_i^T Zr_i over the later reads`
       (plus the final state's cotangent), which gives `dDelta_j = eta * R_j`, and from it
       `dZd_j = V_j dDelta_j`, `dV_j = Zd_j dDelta_j^T`, `deta += <R_j, Delta_j>`.
  Nothing grows with the number of slots beyond the activations; it costs one extra pass over
  the deltas (5 `C x d x F` matmuls per slot against autodiff's 4, 6 with clipping).
  Rebuilding `X_j` by subtracting deltas from the final state would save the first scan but
  cannot undo a reset and drifts by rounding, so the first scan recomputes it exactly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.chunked_scan import chunked_scan
from ttt_jax.ops.ttt_common import matmul

PREFIXES = ("sequential", "associative")
BACKWARDS = ("custom", "autodiff")


class PrefixConfig(NamedTuple):
    """Static settings of one prefix call (hashable: it is a `custom_vjp` nondiff argument)."""

    clip_tau: float | None
    prefix: str
    backward: str
    compute_dtype: jnp.dtype
    state_dtype: jnp.dtype
    checkpoint_group: int | None
    remat_policy: str | None
    unroll: int


def clip_scale(sq: jax.Array, tau: float) -> tuple[jax.Array, jax.Array]:
    """Frobenius clipping factor `min(1, tau / ||D||)` from `sq = ||D||^2` (any shape).

    The inner `where` keeps `rsqrt` away from 0 (an all-zero padded slot), so that autodiff of
    this line has no `0 * inf`; the returned mask says where clipping is active.
    """
    big = sq > tau * tau
    return jnp.where(big, tau * lax.rsqrt(jnp.where(big, sq, 1.0)), 1.0), big


def slot_delta(zd: jax.Array, v: jax.Array, cfg: PrefixConfig) -> jax.Array:
    """`clip(V^T Zd)` of one slot: `zd [B, C, F]`, `v [B, C, d]` -> `[B, d, F]` fp32."""
    delta = matmul("bcd,bcf->bdf", v, zd, cfg.compute_dtype)
    if cfg.clip_tau is not None:
        scale, _ = clip_scale(jnp.sum(delta * delta, axis=(1, 2)), cfg.clip_tau)
        delta = delta * scale[:, None, None]
    return delta


def _update(x, eta, delta, keep, cfg):
    if keep is not None:
        x = x * keep[:, None, None].astype(x.dtype)
    return (x + eta * delta).astype(cfg.state_dtype)


def _sequential(x0, eta, zd, v, zr, keep, cfg):
    def step(x, xs):
        zd_j, v_j, zr_j, keep_j = xs
        o = matmul("bcf,bdf->bcd", zd_j if zr_j is None else zr_j, x, cfg.compute_dtype)
        return _update(x, eta, slot_delta(zd_j, v_j, cfg), keep_j, cfg), o

    x, o = chunked_scan(
        step, x0, (zd, v, zr, keep), checkpoint_group=cfg.checkpoint_group,
        remat_policy=cfg.remat_policy, unroll=cfg.unroll,
    )
    return o, x


def _associative(x0, eta, zd, v, zr, keep, cfg):
    deltas = matmul("nbcd,nbcf->nbdf", v, zd, cfg.compute_dtype)
    if cfg.clip_tau is not None:
        scale, _ = clip_scale(jnp.sum(deltas * deltas, axis=(2, 3)), cfg.clip_tau)
        deltas = deltas * scale[..., None, None]
    deltas = (eta * deltas).astype(cfg.state_dtype)
    if keep is None:
        x_out = x0[None] + lax.associative_scan(jnp.add, deltas, axis=0)
    else:
        # Segmented sum: an element (k, a) maps x -> k * x + a; composing "first (k1, a1) then
        # (k2, a2)" gives (k1 * k2, k2 * a1 + a2), which is associative.
        def combine(first, second):
            (k1, a1), (k2, a2) = first, second
            return k1 * k2, k2[..., None, None] * a1 + a2

        ks, acc = lax.associative_scan(
            combine, (keep.astype(cfg.state_dtype), deltas), axis=0
        )
        x_out = ks[..., None, None] * x0[None] + acc
    x_out = x_out.astype(cfg.state_dtype)
    x_in = jnp.concatenate([x0[None], x_out[:-1]], axis=0)
    o = matmul("nbcf,nbdf->nbcd", zd if zr is None else zr, x_in, cfg.compute_dtype)
    return o, x_out[-1]


def _forward(x0, eta, zd, v, zr, keep, cfg):
    fn = _sequential if cfg.prefix == "sequential" else _associative
    return fn(x0, eta, zd, v, zr, keep, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _custom(x0, eta, zd, v, zr, keep, cfg):
    return _forward(x0, eta, zd, v, zr, keep, cfg)


def _custom_fwd(x0, eta, zd, v, zr, keep, cfg):
    return _forward(x0, eta, zd, v, zr, keep, cfg), (x0, eta, zd, v, zr, keep)


def _custom_bwd(cfg, res, cts):
    x0, eta, zd, v, zr, keep = res
    g_o, g_x = cts
    cd = cfg.compute_dtype

    # Scan 1, forward: rebuild the state each slot reads and pull dO back through the read.
    def read_grad(x, xs):
        zd_j, v_j, g_j, keep_j = xs
        dzr = matmul("bcd,bdf->bcf", g_j, x, cd)
        return _update(x, eta, slot_delta(zd_j, v_j, cfg), keep_j, cfg), dzr

    _, dzr = lax.scan(read_grad, x0, (zd, v, g_o, keep), unroll=cfg.unroll)

    # Scan 2, reverse: R = dL/d(state after slot j), one [B, d, F] running sum.
    def delta_grad(carry, xs):
        r, deta = carry
        zd_j, v_j, zr_j, g_j, keep_j = xs
        if cfg.clip_tau is None:
            # <R, V^T Z> = sum(Z * (V R)): the same V R product gives dZd, so deta is free.
            vr = matmul("bcd,bdf->bcf", v_j, r, cd)
            deta = deta + jnp.sum(vr * zd_j.astype(jnp.float32))
            dzd = eta * vr
            dv = eta * matmul("bcf,bdf->bcd", zd_j, r, cd)
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
            dzd = matmul("bcd,bdf->bcf", v_j, g_raw, cd)
            dv = matmul("bcf,bdf->bcd", zd_j, g_raw, cd)
        r_in = r if keep_j is None else r * keep_j[:, None, None].astype(r.dtype)
        r_in = r_in + matmul("bcd,bcf->bdf", g_j, zd_j if zr_j is None else zr_j, cd)
        return (r_in, deta), (dzd, dv)

    init = (g_x.astype(jnp.float32), jnp.zeros((), jnp.float32))
    (r, deta), (dzd, dv) = lax.scan(
        delta_grad, init, (zd, v, zr, g_o, keep), reverse=True, unroll=cfg.unroll
    )
    if zr is None:
        dzd, dzr_out = dzd + dzr, None
    else:
        dzr_out = dzr.astype(zr.dtype)
    return (
        r.astype(x0.dtype),
        deta.astype(eta.dtype),
        dzd.astype(zd.dtype),
        dv.astype(v.dtype),
        dzr_out,
        None if keep is None else jnp.zeros_like(keep),
    )


_custom.defvjp(_custom_fwd, _custom_bwd)


def exclusive_prefix(
    x0: jax.Array,
    eta: jax.Array,
    zd: jax.Array,
    v: jax.Array,
    zr: jax.Array | None,
    keep: jax.Array | None,
    cfg: PrefixConfig,
) -> tuple[jax.Array, jax.Array]:
    """Reads and updates of the fast weight over slots (module docstring).

    Args:
      x0: `[B, d, F]` state entering slot 0 (state dtype).
      eta: `[]` learning rate (state dtype).
      zd: `[N, B, C, F]` tokens whose delta each slot adds (compute dtype).
      v: `[N, B, C, d]` their targets (compute dtype).
      zr: `[N, B, C, F]` tokens that read the state entering each slot; None: `zd`.
      keep: `[N, B]` 0 where the state resets before slot j's delta (a new document), else 1;
        None: never.
      cfg: static settings.

    Returns:
      `o: [N, B, C, d]` fp32 reads `Zr_j X_j^T`, and the state after the last slot.
    """
    if cfg.backward == "custom":
        return _custom(x0, eta, zd, v, zr, keep, cfg)
    return _forward(x0, eta, zd, v, zr, keep, cfg)
