"""Packed documents (`segment_ids`) for TTT-Linear and TTT-MLP: the slot scan and the banded
reads of the reset state (SPEC 2, document boundaries; the layout is `ttt_jax.ops.core.segments`).

Per document, mini-batches count from its first token; every document after the call's first
starts from the slow weights (the `W1, b1, ...` arguments), the first one from `initial_state`.
With the slot layout of the packed row, one scan over at most `N = T // C` slots does it all:

- slot j holds one complete mini-batch of some document (or padding). Entering it, the state
  is reset to the slow weights if the slot starts a document; the family's `step` then reads the
  slot's tokens in dual form and updates the state, exactly as without segments;
- a reset slot first reads the previous document's trailing partial mini-batch (its "tail")
  with the state it carries in, the previous document's final state (the same `step`, its
  update dropped). The tail of the last document with a complete mini-batch reads the state
  after the last slot, as the unsegmented path reads its tail;
- documents without a complete mini-batch (other than the call's first) read the slow weights
  with within-document updates only: one constant state for all of them, so they need no scan.
  `const_reads` computes their dual form over the row in blocks of C from position 0 (a
  document shorter than C lies in one block or two neighbours), `[B, H, T, C]` rate matrices
  twice, the size of the scan's own `[n, B, H, C, C]`.

Reads that no row needs are skipped with `lax.cond` (predicates over the whole batch): the tail
read in slots where no row has a tail, the step in slots where all rows are padding, the banded
reads when no row has a short document. So a row of long documents costs the unsegmented path's
matmuls plus one tail read per document. Each token's output comes from exactly one of these
reads and is scattered back to its position; `segment_ids` with one document give the
unsegmented path's results bit for bit.

Memory: tokens are gathered slot by slot inside the scan (no reordered copy of q, k, v), the
slot outputs are two `[N, B, H, C, D]` arrays (own tokens, tails) and the scan runs through
`chunked_scan`, so `checkpoint_group` and `remat_policy` act on it as they do without segments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.core.numerics import matmul
from ttt_jax.ops.core.scan import chunked_scan
from ttt_jax.ops.core.segments import doc_spans, gather_time, scatter_time, slot_layout


class Band(NamedTuple):
    """Within-document pairs of the constant readers, in blocks of C tokens from position 0.

    Attributes:
      own: `[B, N, 1, C, C]` float, 1 where token i of block n reads token j <= i of the same
        block (same document, i in a short document).
      prev: `[B, N, 1, C, C]` float, the same for token j of block n - 1.
      scale: `[B, N, 1, C]` `token_scale` at each reader's position in its document (0 for
        tokens that are not constant readers).
    """

    own: jax.Array
    prev: jax.Array
    scale: jax.Array


def to_blocks(x: jax.Array, c: int) -> jax.Array:
    """`[B, T, H, ...]` -> `[B, N, H, C, ...]`, zero-padded to `N = ceil(T / C)` blocks."""
    b, t = x.shape[:2]
    n = -(-t // c)
    x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(b, n, c, *x.shape[2:]), 2, 3)


def from_blocks(x: jax.Array, t: int) -> jax.Array:
    """Inverse of `to_blocks`: `[B, N, H, C, ...]` -> `[B, T, H, ...]`."""
    b, n, h, c = x.shape[:4]
    return jnp.swapaxes(x, 2, 3).reshape(b, n * c, h, *x.shape[4:])[:, :t]


def prev_block(x: jax.Array) -> jax.Array:
    """Block n - 1 at block n along axis 1 (zeros at block 0)."""
    return jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))[:, :-1]


def band_rates(eta: jax.Array, band: Band) -> tuple[jax.Array, jax.Array]:
    """`E[i, j] = token_scale[pos_i] * eta[j]` on the band: `eta: [B, N, H, C]` ->
    `(E_own, E_prev)`, each `[B, N, H, C, C]` (pairs within block n, and with block n - 1)."""
    scale = band.scale[..., None]
    return scale * band.own * eta[..., None, :], scale * band.prev * prev_block(eta)[..., None, :]


def band_dual(a, b, g, e_own, e_prev, compute_dtype) -> jax.Array:
    """`sum_j E[i, j] (a_i . b_j + 1) g_j` over the band: the dual-form correction of one inner
    layer (`a, b: [B, N, H, C, X]`, `g: [B, N, H, C, Y]`, `E` from `band_rates`)."""
    cd = compute_dtype
    attn_own = e_own * (matmul("bnhix,bnhjx->bnhij", a, b, cd) + 1.0)
    attn_prev = e_prev * (matmul("bnhix,bnhjx->bnhij", a, prev_block(b), cd) + 1.0)
    return matmul("bnhij,bnhjy->bnhiy", attn_own, g, cd) + matmul(
        "bnhij,bnhjy->bnhiy", attn_prev, prev_block(g), cd
    )


def _band(spans, short: jax.Array, token_scale: jax.Array, c: int) -> Band:
    t = short.shape[1]
    n = -(-t // c)

    def blocks(x, fill):
        return jnp.pad(x, [(0, 0), (0, n * c - t)], constant_values=fill).reshape(-1, n, c)

    start = blocks(spans.start, -1)
    reader = blocks(short, False)
    same_own = (start[..., :, None] == start[..., None, :]) & jnp.tril(jnp.ones((c, c), bool))
    # Block 0 has no previous block (prev_block fills it with start 0: no reader's start).
    same_prev = start[..., :, None] == prev_block(start)[..., None, :]
    same_prev = same_prev & (jnp.arange(n) > 0)[None, :, None, None]
    own = (same_own & reader[..., :, None]).astype(token_scale.dtype)
    prev = (same_prev & reader[..., :, None]).astype(token_scale.dtype)
    pos = jnp.clip(blocks(spans.within, 0), 0, c - 1)
    scale = jnp.where(reader, token_scale[pos], 0.0).astype(token_scale.dtype)
    return Band(own=own[:, :, None], prev=prev[:, :, None], scale=scale[:, :, None])


def run_packed(
    step: Callable[[Any, tuple], tuple[Any, jax.Array]],
    const_reads: Callable[..., jax.Array],
    state: Any,
    reset: Any,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    eta: jax.Array,
    segment_ids: jax.Array,
    *,
    token_scale: jax.Array,
    mini_batch_size: int,
    checkpoint_group: int | None,
    remat_policy: str | None,
    unroll: int,
) -> tuple[jax.Array, Any]:
    """`run_mini_batches` for packed documents (module docstring).

    Args:
      step: `(state, (q, k, v, eta)) -> (state, out)` on one mini-batch laid out `[B, H, C, D]`
        (`eta: [B, H, C]`), as for `run_mini_batches`; positions past a tail are zeros.
      const_reads: `(q, k, v, eta, band) -> out`, the outputs of tokens that read the reset
        state, on blocks `[B, N, H, C, D]` (`eta: [B, N, H, C]`, as given: the family casts
        it as its step does), with the within-document pairs `band` (`band_rates`,
        `band_dual`); only its outputs at constant readers are used.
      state: the state the call's first document starts from (fields `[B, H, ...]`).
      reset: the state every later document starts from (same structure).
      q, k, v: `[B, T, H, D]`; eta: `[B, T, H]`; segment_ids: `[B, T]` integers.
      token_scale: `[C]`, as the family's step uses it.
      mini_batch_size, checkpoint_group, remat_policy, unroll: as for `run_mini_batches`.

    Returns:
      `(out [B, T, H, D] as the step's outputs, state of the last document after its last
      complete mini-batch)`.
    """
    b, t = q.shape[:2]
    c = mini_batch_size
    n = t // c
    lay = slot_layout(segment_ids, c, jnp.float32)
    spans = doc_spans(segment_ids)
    xs = (q, k, v, eta)

    def take(idx):  # idx [B, C] -> one mini-batch [B, H, C, ...]
        return tuple(jnp.swapaxes(gather_time(x, idx), 1, 2) for x in xs)

    # A slot's own tokens are never the tokens that read its entering state when it resets:
    # those are the previous document's tail, the only readers left in `read_idx`.
    tail_idx = jnp.where(lay.read_idx == lay.delta_idx, t, lay.read_idx)
    last = take(lay.last_read_idx)
    out_struct = jax.eval_shape(step, state, last)[1]

    def zeros_out():
        return jnp.zeros(out_struct.shape, out_struct.dtype)

    def slot(s, x):
        own, tail_j, reset_j, has_own, has_tail = x
        out_tail = lax.cond(has_tail, lambda: step(s, take(tail_j))[1], zeros_out)
        s_in = jax.tree.map(
            lambda r, w: jnp.where(reset_j.reshape(-1, *[1] * (w.ndim - 1)), r, w), reset, s
        )
        s_new, out_own = lax.cond(
            has_own, lambda: step(s_in, own), lambda: (s_in, zeros_out())
        )
        return s_new, (out_own, out_tail)

    def by_slot(idx):  # [B, N C] -> [N, B, C]
        return jnp.moveaxis(idx.reshape(b, n, c), 1, 0)

    def unslot(o, idx):  # [N, B, H, C, D] at idx [B, N C] -> [B, T, H, D]
        o = jnp.swapaxes(jnp.moveaxis(o, 0, 1), 2, 3)
        return scatter_time(o.reshape(b, n * c, *o.shape[3:]), idx, t)

    parts = []
    if n:
        # The own tokens as the unsegmented path lays them out, [N, B, H, C, ...].
        own = tuple(
            jnp.swapaxes(jnp.moveaxis(gather_time(x, lay.delta_idx).reshape(b, n, c, *x.shape[2:]), 1, 0), 2, 3)
            for x in xs
        )
        scan_xs = (
            own,
            by_slot(tail_idx),
            jnp.moveaxis(lay.keep == 0, 1, 0),
            jnp.any(by_slot(lay.delta_idx)[:, :, 0] < t, axis=1),
            jnp.any(by_slot(tail_idx)[:, :, 0] < t, axis=1),
        )
        state, (out_own, out_tail) = chunked_scan(
            slot,
            state,
            scan_xs,
            checkpoint_group=checkpoint_group,
            remat_policy=remat_policy,
            unroll=unroll,
        )
        parts = [unslot(out_own, lay.delta_idx), unslot(out_tail, tail_idx)]
    _, out_last = step(state, last)
    parts.append(scatter_time(jnp.swapaxes(out_last, 1, 2), lay.last_read_idx, t))
    out = sum(parts[1:], parts[0])

    # Documents with no complete mini-batch, other than the call's first.
    short = (spans.start > 0) & (spans.length < c)
    band = _band(spans, short, token_scale, c)

    def banded():
        blocks = [to_blocks(x, c) for x in xs]
        return from_blocks(const_reads(*blocks, band), t).astype(out.dtype)

    out_short = lax.cond(jnp.any(short), banded, lambda: jnp.zeros_like(out))
    out = out + jnp.where(short[..., None, None], out_short, 0.0)

    # The carried state is the last document's only if it had a complete mini-batch (or is the
    # call's first); a later document without one ends where it started.
    final = jax.tree.map(
        lambda r, w: jnp.where(lay.last_continues.reshape(-1, *[1] * (w.ndim - 1)), w, r),
        reset,
        state,
    )
    return out, final
