"""Packed documents (`segment_ids`) for LaCT: chunks restart at each document (SPEC 2).

Per document, chunks count from its first token; every document after the call's first starts
from the slow weights (`w0, w1, w2`, zero momentum), the first from `initial_state`; the final
state is the last document's. The slot layout of `ttt_jax.ops.core.segments` places the
tokens: slot j holds one complete chunk of some document (or padding, at the end). A LaCT
read is per token (`f_W(q_t)`, no mixing inside a chunk), so every token reads exactly one
state, and the slot step is LaCT's chunk step with two additions:

- it first reads the slot's *tail* tokens (the previous document's trailing partial chunk)
  with the state it carries in, that document's final state;
- it then resets the state to the slow weights where the slot starts a document (`reset`),
  reads its own tokens and takes the inner step; rows where the slot is padding keep their
  state (padding would change it: weight norm rescales, momentum decays).

The tail of the last document with a complete chunk (or of the first document) reads the state
after the last slot, as the unsegmented path reads its partial chunk. Documents without a
complete chunk, other than the first, read the slow weights: `read_short` applies them block by
block (C tokens on the grid from position 0), skipping blocks with no such token.

Both backwards walk the same slots: `backward="custom"` through `vjp.custom_reads` with
`PackedWalk` (chunk-boundary states only, as without documents), "autodiff" through
`chunked_scan`. Reads no row needs are skipped with `lax.cond` (predicates over the batch):
the tail read of a slot without tails in any row, the step of a slot that is padding in every
row. With one document the outputs and state are those of the unsegmented path.

Memory: the slot scans carry what the unsegmented scans carry; the tail read adds one `[B, C]`
read per slot to the backward's recomputation, and `read_short` keeps its block inputs only
(each block is checkpointed). Measured on abstract shapes in
`tests/ops/lact/test_lact_segments.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.core.scan import chunked_scan
from ttt_jax.ops.core.segments import doc_spans, gather_time, scatter_time, slot_layout
from ttt_jax.ops.lact.math import Chunk, ChunkConfig, FastState, apply_fast_weights, update_state
from ttt_jax.ops.lact.vjp import custom_reads


class PackedLayout(NamedTuple):
    """Token indices of the slots (`[B, ...]` int32; value T is padding, gathered as 0).

    Attributes:
      own_idx: `[B, N C]` the tokens of slot j at `[j C, (j + 1) C)`.
      tail_idx: `[B, N C]` the tail tokens reading the state entering slot j (before its reset).
      reset: `[B, N]` bool, slot j starts a document after the first.
      last_idx: `[B, C]` the tokens reading the state after the last slot.
    """

    own_idx: jax.Array
    tail_idx: jax.Array
    reset: jax.Array
    last_idx: jax.Array


class SlotTokens(NamedTuple):
    """The differentiable inputs of one slot: its own chunk and its tail's queries."""

    own: Chunk
    tail_q: jax.Array


class SlotFlags(NamedTuple):
    """Static-for-the-derivative facts of one slot: `reset, valid: [B]` bool (the row starts a
    document / holds a complete chunk here), `any_tail, any_valid: []` bool over the batch."""

    reset: jax.Array
    valid: jax.Array
    any_tail: jax.Array
    any_valid: jax.Array


def packed_layout(segment_ids: jax.Array, chunk_size: int) -> PackedLayout:
    lay = slot_layout(segment_ids, chunk_size, jnp.float32)
    # A slot's own tokens are in `read_idx` only where the slot does not reset; what is left
    # there are the tails reading the state entering the slot.
    tail_idx = jnp.where(lay.read_idx == lay.delta_idx, segment_ids.shape[1], lay.read_idx)
    return PackedLayout(lay.delta_idx, tail_idx, lay.keep == 0, lay.last_read_idx)


def _rows(flag: jax.Array, ndim: int) -> jax.Array:
    return flag.reshape(-1, *[1] * (ndim - 1))


def _reset(state: FastState, slow, reset: jax.Array) -> FastState:
    """The state entering a slot: the slow weights and zero momentum where it resets."""
    ws, ms = state
    ws = tuple(jnp.where(_rows(reset, w.ndim), w0[None], w) for w, w0 in zip(ws, slow, strict=True))
    ms = tuple(jnp.where(_rows(reset, m.ndim), jnp.zeros_like(m), m) for m in ms)
    return ws, ms


def _keep_padding(valid: jax.Array, new: FastState, old: FastState) -> FastState:
    return jax.tree.map(lambda a, b: jnp.where(_rows(valid, a.ndim), a, b), new, old)


def _read(ws, q: jax.Array, cfg: ChunkConfig) -> jax.Array:
    return apply_fast_weights(ws, q, cfg.compute_dtype, cfg.backward_dtype).astype(q.dtype)


class PackedWalk:
    """The slots of packed documents, for `vjp.custom_reads` (see `vjp.DenseWalk`);
    `params = (ref_norms, slow weights)`, `layout` a `PackedLayout`."""

    def fetch(self, inputs: Chunk, layout: PackedLayout, j, c: int):
        t = inputs.q.shape[1]
        own, tail = self._idx(layout, j, c)
        valid = own[:, 0] < t
        # A padding row's update is computed and dropped (`_keep_padding`). On zero tokens its
        # inner gradient is exactly 0, and the derivative of Newton-Schulz's norm at 0 is
        # inf: 0 * inf = NaN would reach the kept rows' gradients through the select. It reads
        # the row's tokens at the slot's grid position instead (finite, and its cotangents
        # are 0 and never written back: `put_ct` drops index T).
        safe = jnp.where(own < t, own, j * c + jnp.arange(c))
        x = SlotTokens(
            jax.tree.map(lambda a: gather_time(a, safe), inputs), gather_time(inputs.q, tail)
        )
        reset = lax.dynamic_index_in_dim(layout.reset, j, axis=1, keepdims=False)
        return x, SlotFlags(reset, valid, jnp.any(tail < t), jnp.any(valid))

    def step(self, s, x: SlotTokens, flags: SlotFlags, params, cfg: ChunkConfig):
        ref_norms, slow = params
        zeros = jnp.zeros_like(x.tail_q)
        o_tail = lax.cond(flags.any_tail, lambda: _read(s[0], x.tail_q, cfg), lambda: zeros)
        s_in = _reset(s, slow, flags.reset)

        def full():
            o = _read(s_in[0], x.own.q, cfg)
            return _keep_padding(flags.valid, update_state(s_in, x.own, ref_norms, cfg), s_in), o

        s_new, o_own = lax.cond(flags.any_valid, full, lambda: (s_in, zeros))
        return s_new, (o_own, o_tail)

    def update(self, s, x: SlotTokens, flags: SlotFlags, params, cfg: ChunkConfig):
        ref_norms, slow = params
        s_in = _reset(s, slow, flags.reset)

        def full():
            return _keep_padding(flags.valid, update_state(s_in, x.own, ref_norms, cfg), s_in)

        return lax.cond(flags.any_valid, full, lambda: s_in)

    def _idx(self, layout: PackedLayout, j, c: int):
        own = lax.dynamic_slice_in_dim(layout.own_idx, j * c, c, axis=1)
        return own, lax.dynamic_slice_in_dim(layout.tail_idx, j * c, c, axis=1)

    def write(self, o, out, layout: PackedLayout, j, c: int):
        rows = jnp.arange(o.shape[0])[:, None]
        for idx, values in zip(self._idx(layout, j, c), out, strict=True):
            o = o.at[rows, idx].set(values.astype(o.dtype), mode="drop")
        return o

    def out_ct(self, g_o, layout: PackedLayout, j, c: int):
        return tuple(gather_time(g_o, idx) for idx in self._idx(layout, j, c))

    def put_ct(self, grads: Chunk, g_x: SlotTokens, layout: PackedLayout, j, c: int) -> Chunk:
        own, tail = self._idx(layout, j, c)
        rows = jnp.arange(grads.q.shape[0])[:, None]
        add = lambda b, x, idx: b.at[rows, idx].add(x.astype(b.dtype), mode="drop")  # noqa: E731
        grads = jax.tree.map(lambda b, x: add(b, x, own), grads, g_x.own)
        return grads._replace(q=add(grads.q, g_x.tail_q, tail))

    def has_last(self, t: int, n: int, c: int) -> bool:
        return True

    def write_last(self, o, ws, inputs: Chunk, layout: PackedLayout, n: int, cfg: ChunkConfig):
        rows = jnp.arange(o.shape[0])[:, None]
        out = _read(ws, gather_time(inputs.q, layout.last_idx), cfg)
        return o.at[rows, layout.last_idx].set(out, mode="drop")

    def back_last(self, ws, inputs: Chunk, layout: PackedLayout, g_o, n: int, cfg: ChunkConfig):
        q_last = gather_time(inputs.q, layout.last_idx)
        _, vjp = jax.vjp(lambda ws, q: _read(ws, q, cfg), ws, q_last)
        return vjp(gather_time(g_o, layout.last_idx))

    def put_last(self, grads: Chunk, g_q, layout: PackedLayout, n: int, c: int) -> Chunk:
        rows = jnp.arange(grads.q.shape[0])[:, None]
        q = grads.q.at[rows, layout.last_idx].add(g_q.astype(grads.q.dtype), mode="drop")
        return grads._replace(q=q)


PACKED = PackedWalk()


def _autodiff(state, inputs: Chunk, params, layout: PackedLayout, n: int, cfg: ChunkConfig):
    """The slot scan under plain autodiff (`chunked_scan`, so the remat knobs act on it)."""
    c, (b, t) = cfg.chunk_size, inputs.q.shape[:2]
    o = jnp.zeros_like(inputs.q)
    if n:

        def body(s, j):
            x, flags = PACKED.fetch(inputs, layout, j, c)
            return PACKED.step(s, x, flags, params, cfg)

        state, outs = chunked_scan(
            body,
            state,
            jnp.arange(n),
            checkpoint_group=cfg.checkpoint_group,
            remat_policy=cfg.remat_policy,
        )  # outs: ([N, B, C, H, D], [N, B, C, H, D])
        for idx, out in zip((layout.own_idx, layout.tail_idx), outs, strict=True):
            out = jnp.moveaxis(out, 0, 1).reshape(b, n * c, *out.shape[3:])
            o = o + scatter_time(out, idx, t)
    return PACKED.write_last(o, state[0], inputs, layout, n, cfg), state


def read_short(q: jax.Array, slow, short: jax.Array, cfg: ChunkConfig) -> jax.Array:
    """`f_{W0}(q_t)` at the tokens of `short: [B, T]` (zeros elsewhere), `q: [B, T, H, D]`.

    Blocks of C tokens from position 0, each checkpointed (the backward keeps its inputs) and
    skipped with `lax.cond` where no row has a short-document token.
    """
    c, (b, t) = cfg.chunk_size, q.shape[:2]
    nb = -(-t // c)
    ws = tuple(jnp.broadcast_to(w[None], (b, *w.shape)) for w in slow)
    pad = nb * c - t
    qb = jnp.moveaxis(
        jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, nb, c, *q.shape[2:]), 1, 0
    )
    needed = jnp.any(jnp.pad(short, [(0, 0), (0, pad)]).reshape(b, nb, c), axis=(0, 2))

    def block(_, x):
        q_j, needed_j = x
        read = jax.checkpoint(lambda ws, q: _read(ws, q, cfg))
        return None, lax.cond(needed_j, read, lambda ws, q: jnp.zeros_like(q), ws, q_j)

    _, out = lax.scan(block, None, (qb, needed))
    out = jnp.moveaxis(out, 0, 1).reshape(b, nb * c, *q.shape[2:])[:, :t]
    return jnp.where(short[..., None, None], out, 0).astype(q.dtype)


def packed_reads(
    state: FastState,
    inputs: Chunk,
    ref_norms,
    slow,
    segment_ids: jax.Array,
    *,
    cfg: ChunkConfig,
    backward: str,
) -> tuple[jax.Array, FastState]:
    """Every token's read of the fast weight with documents packed in a row.

    Args:
      state: `(ws, ms)` the call's first document starts from (state dtype).
      inputs: the whole sequence (`Chunk` of `[B, T, H, ...]`).
      ref_norms: row norms of the slow weights (weight-norm targets).
      slow: `(w0, w1, w2)` `[H, ...]` in the state dtype, every later document's start.
      segment_ids: `[B, T]` integers, a new document wherever the id changes.
      cfg: static settings; backward: "custom" or "autodiff".

    Returns:
      `o: [B, T, H, D]` in q's dtype and the last document's state after its last complete
      chunk (the slow weights and zero momentum if that document has none and is not the
      first).
    """
    c, t = cfg.chunk_size, inputs.q.shape[1]
    n = t // c
    layout = packed_layout(segment_ids, c)
    params = (ref_norms, slow)
    if backward == "custom":
        o, carried = custom_reads(state, inputs, params, layout, n=n, cfg=cfg, walk=PACKED)
    else:
        o, carried = _autodiff(state, inputs, params, layout, n, cfg)
    spans = doc_spans(segment_ids)
    short = (spans.start > 0) & (spans.length < c)
    o = o + read_short(inputs.q, slow, short, cfg)
    # The carried state is the last document's if it had a complete chunk or is the first.
    last_continues = (spans.start[:, -1] == 0) | (spans.length[:, -1] >= c)
    restart = _reset(carried, slow, jnp.ones_like(last_continues))
    final = jax.tree.map(
        lambda a, r: jnp.where(_rows(last_continues, a.ndim), a, r), carried, restart
    )
    return o, final
