"""The exclusive prefix of In-Place TTT (SPEC 3.3): its plain forms and shared pieces.

This module sees the problem after the sequence has been laid out as `n` *slots* of `C` tokens
(one complete chunk each, see `op.py`). Per sample, with the fast weight `X` carried
across slots (`[d, F]`, in the state dtype):

    o[Zr_j]  += Zr_j X_j^T                              read: the state *before* slot j
    X_j+1     = keep_j * X_j + eta * clip(V_j^T Zd_j)   update: slot j's delta, after its read
    o[Zlast] += Zlast X_n^T                             the tokens after the last update
    o        += Z W_base^T                              optional base term, every token

`Zd_j, V_j` are the slot's tokens and targets (`[C, F]`, `[C, d]`), `Zr_j` the tokens that read
the state entering slot j (the slot's own tokens, or other tokens when documents are packed),
`keep_j` is 0 where a new document starts (the state resets) and `Zlast` the tokens after the
last complete chunk. Every slot reads the state from *before* its own update: the prefix is
exclusive, chunk j never sees itself. Tokens are named by position: the j-th run of C tokens
(and the trailing partial run) without indices, or index arrays for packed documents.

Two forwards compute this (`prefix=`):

- `sequential`: a scan over slots carrying one `[B, d, F]` state (the shared `chunked_scan`).
- `associative`: all deltas `[B, n, d, F]` at once and `lax.associative_scan` over them, the
  parallel form that shards over the slot axis (context parallelism). By its nature it
  materialises per-slot deltas and states (several `[B, n, d, F]` arrays) in its forward:
  parallel, not memory-lean.

Two backwards (`backward=`):

- `autodiff` (`plain_reads` here): JAX differentiates the chosen forward. The sequential scan
  then stores the carried state of every slot (`[n, B, d, F]`, fewer with
  `checkpoint_group`), the associative form its prefix sums.
- `custom` (`vjp.py`): a `jax.custom_vjp` whose backward is a reverse scan carrying
  one running sum `R` and keeps nothing per slot.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from ttt_jax.ops.core.numerics import matmul, wide_dtype
from ttt_jax.ops.core.scan import chunked_scan

PREFIXES = ("sequential", "associative")
# checkpoint_name tags of the autodiff scan, usable in `save_names:` remat policies.
NAMES = ("inplace_delta",)


class PrefixConfig(NamedTuple):
    """Static settings of one prefix call (hashable: it is a `custom_vjp` nondiff argument)."""

    chunk_size: int
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


def slot_update(x, eta, zd, v, keep, cfg, tag=False):
    """The state after one slot, `keep * x + eta * clip(V^T Zd)`, in the state dtype.

    Without clipping, eta scales V (`[B, C, d]`, small) rather than the `[B, d, F]` delta, so
    that the add can ride on the matmul (an accumulating GEMM): the state is read and written
    once per slot, which matters since per slot it is as large as the matmul's inputs.
    """
    if keep is not None:
        x = x * keep[:, None, None].astype(x.dtype)
    if cfg.clip_tau is None:
        ev = eta * v.astype(wide_dtype(v.dtype, eta.dtype))
        delta = matmul("bcd,bcf->bdf", ev, zd, cfg.compute_dtype)
    else:
        delta = eta * slot_delta(zd, v, cfg)
    if tag:
        delta = checkpoint_name(delta, "inplace_delta")
    return (x + delta).astype(cfg.state_dtype)


def take(a: jax.Array, idx: jax.Array | None, start, length: int) -> jax.Array:
    """Rows of `a: [B, T, ...]`: `[start, start + length)`, or `a[b, idx[b, i]]` (0 past T)."""
    if idx is None:
        return lax.dynamic_slice_in_dim(a, start, length, axis=1)
    return a.at[jnp.arange(a.shape[0])[:, None], idx].get(mode="fill", fill_value=0)


def add_at(buf: jax.Array, idx: jax.Array | None, start, value: jax.Array) -> jax.Array:
    """Adds `value: [B, L, ...]` into `buf` where `take` read it (indices past T dropped).

    Carried through a scan, this updates the buffer in place: no per-slot copies.
    """
    if idx is None:
        old = lax.dynamic_slice_in_dim(buf, start, value.shape[1], axis=1)
        new = (old.astype(wide_dtype(buf.dtype, value.dtype)) + value).astype(buf.dtype)
        return lax.dynamic_update_slice_in_dim(buf, new, start, axis=1)
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, idx].add(value.astype(buf.dtype), mode="drop")


def slot_idx(idx: jax.Array | None, j, c: int) -> jax.Array | None:
    return None if idx is None else lax.dynamic_slice_in_dim(idx, j * c, c, axis=1)


def keep_of(keep: jax.Array | None, j) -> jax.Array | None:
    return None if keep is None else lax.dynamic_index_in_dim(keep, j, axis=1, keepdims=False)


def last_rows(z: jax.Array, last_idx: jax.Array | None, n: int, c: int) -> tuple[int, int]:
    """Start and length of the tokens after the last slot (`last_idx` overrides)."""
    if last_idx is not None:
        return 0, last_idx.shape[1]
    return n * c, z.shape[1] - n * c


def base_term(z: jax.Array, w_base: jax.Array | None, d: int, cfg: PrefixConfig) -> jax.Array:
    """`Z W_base^T` (`[B, T, d]`, fp32; fp64 when the compute or the state dtype is), zeros
    without a base: the buffer every read is added into."""
    acc = wide_dtype(cfg.compute_dtype, cfg.state_dtype)
    if w_base is None:
        return jnp.zeros((z.shape[0], z.shape[1], d), acc)
    return matmul("btf,df->btd", z, w_base, cfg.compute_dtype).astype(acc)


def _gathered(z, idx, n, c):
    """Slot tokens as one `[B, n C, F]` array (the plain forms only)."""
    return z[:, : n * c] if idx is None else take(z, idx, 0, n * c)


def _sequential(x0, eta, z, v, keep, delta_idx, read_idx, n, cfg):
    """The plain scan over slots: what `backward="autodiff"` differentiates."""
    c, cd = cfg.chunk_size, cfg.compute_dtype
    b = x0.shape[0]

    def step(x, xs):
        zd_j, v_j, zr_j, keep_j = xs
        o = matmul("bcf,bdf->bcd", zr_j, x, cd)
        return slot_update(x, eta, zd_j, v_j, keep_j, cfg, tag=True), o

    def slots_first(a):
        return jnp.moveaxis(a.reshape(b, n, c, *a.shape[2:]), 1, 0)

    zd = _gathered(z, delta_idx, n, c)
    zr = zd if read_idx is None else _gathered(z, read_idx, n, c)
    xs = (
        slots_first(zd),
        slots_first(v),
        slots_first(zr),
        None if keep is None else jnp.moveaxis(keep, 1, 0),
    )
    x, o = chunked_scan(
        step,
        x0,
        xs,
        checkpoint_group=cfg.checkpoint_group,
        remat_policy=cfg.remat_policy,
        unroll=cfg.unroll,
    )
    return jnp.moveaxis(o, 0, 1).reshape(b, n * c, -1), x


def associative_reads(x0, eta, z, v, keep, delta_idx, read_idx, n, cfg):
    """All deltas at once and a parallel prefix over them (materialises `[B, n, d, F]`).

    Returns the slot reads `[B, n C, d]` (fp32, in slot order) and the final state.
    """
    c, cd, sd = cfg.chunk_size, cfg.compute_dtype, cfg.state_dtype
    b = x0.shape[0]

    def slots(a):
        return a.reshape(b, n, c, *a.shape[2:])

    zd = _gathered(z, delta_idx, n, c)
    zr = zd if read_idx is None else _gathered(z, read_idx, n, c)
    deltas = matmul("bncd,bncf->bndf", slots(v), slots(zd), cd)
    if cfg.clip_tau is not None:
        scale, _ = clip_scale(jnp.sum(deltas * deltas, axis=(2, 3)), cfg.clip_tau)
        deltas = deltas * scale[..., None, None]
    deltas = (eta * deltas).astype(sd)
    if keep is None:
        x_out = x0[:, None] + lax.associative_scan(jnp.add, deltas, axis=1)
    else:
        # Segmented sum: an element (k, a) maps x -> k * x + a; "first (k1, a1) then (k2, a2)"
        # is (k1 * k2, k2 * a1 + a2), an associative composition.
        def combine(first, second):
            (k1, a1), (k2, a2) = first, second
            return k1 * k2, k2[..., None, None] * a1 + a2

        ks, acc = lax.associative_scan(combine, (keep.astype(sd), deltas), axis=1)
        x_out = ks[..., None, None] * x0[:, None] + acc
    x_out = x_out.astype(sd)
    x_in = jnp.concatenate([x0[:, None], x_out[:, :-1]], axis=1)
    o = matmul("bncf,bndf->bncd", slots(zr), x_in, cd)
    return o.reshape(b, n * c, -1), x_out[:, -1]


def assemble(o_slots, x, z, w_base, read_idx, last_idx, n, cfg, o=None):
    """Puts slot reads, the reads after the last slot and the base term at their tokens
    (into `o` if given: slot reads and base already there)."""
    if o is None:
        o = base_term(z, w_base, x.shape[1], cfg)
        if n:
            o = add_at(o, read_idx, 0, o_slots)
    start, length = last_rows(z, last_idx, n, cfg.chunk_size)
    if length:
        z_last = take(z, last_idx, start, length)
        o = add_at(o, last_idx, start, matmul("btf,bdf->btd", z_last, x, cfg.compute_dtype))
    return o


def plain_reads(x0, eta, z, v, w_base, keep, delta_idx, read_idx, last_idx, n, cfg):
    """The whole computation in plain, differentiable JAX (`backward="autodiff"`)."""
    o_slots, x = None, x0
    if n:
        reads = associative_reads if cfg.prefix == "associative" else _sequential
        o_slots, x = reads(x0, eta, z, v, keep, delta_idx, read_idx, n, cfg)
    return assemble(o_slots, x, z, w_base, read_idx, last_idx, n, cfg), x
