"""Packed documents: where each token goes when chunks restart at every document (SPEC 2).

With `segment_ids`, chunks (mini-batches) restart at every document's first token, so they no
longer sit on a grid of C from position 0. A recurrent op scans *slots* of C tokens instead,
each slot naming its tokens by position:

- **delta slots**: the *complete* chunks of all documents, in order. A complete chunk has C
  tokens, so there are at most `N = T // C` of them whatever the documents are: the slots
  never hold more tokens than the input. Unused slots are all padding (index T, gathered as
  zero tokens), which every family's update leaves the state unchanged on.
- **resets**: a slot holding the first chunk of any document but the call's first resets the
  state to the slow-weight arguments (`keep = 0`), so documents never see each other.
- **readers**: tokens that read *the state entering some slot*: the tokens of a complete
  chunk other than a document's first read the state entering their own slot; the trailing
  partial chunk of a document (its "tail") reads the state after the document's last complete
  chunk, which is the state entering the next slot (a reset slot, or padding, or the reads
  after the last slot). The call's first document continues from `initial_state`; its tail
  (or all of it, if it is shorter than C) reads the carried state like any tail.
- **constant readers**: the rest, i.e. a reset slot's own tokens and whole documents shorter
  than C other than the call's first, read the reset state, the same for all of them. How
  they are read is the family's choice (In-Place: a base term; TTT: its dual form).

Every index is computed from `segment_ids` with cumulative max/min/sum over time, so the layout
is traced (any positions, any number of documents) while all shapes stay static.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class SlotLayout(NamedTuple):
    """Gather indices into `[B, T]` (value T means "padding": gather fills 0).

    Attributes:
      delta_idx: `[B, N C]` token at each position of the delta slots (slot j is `[j C,
        (j + 1) C)`).
      keep: `[B, N]` float, 0 where slot j starts a document after the first.
      read_idx: `[B, N C]` tokens reading the state entering slot j.
      last_read_idx: `[B, C]` tokens reading the state after the last slot (the tail of the
        last document with a complete chunk, or of the first document).
      last_continues: `[B]` bool: the last document has a complete chunk or is the first one,
        i.e. the carried state after the last slot is the last document's.
    """

    delta_idx: jax.Array
    keep: jax.Array
    read_idx: jax.Array
    last_read_idx: jax.Array
    last_continues: jax.Array


class DocSpans(NamedTuple):
    """Per token of `[B, T]` segment ids: its document's `start` (first position), `length`,
    and its own position `within` the document (all int32 `[B, T]`)."""

    start: jax.Array
    length: jax.Array
    within: jax.Array


def doc_spans(segment_ids: jax.Array) -> DocSpans:
    """The document of every token (a new document wherever the id changes)."""
    b, t = segment_ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    edge = jnp.ones((b, 1), bool)
    start = jnp.concatenate([edge, change], axis=1)
    end = jnp.concatenate([change, edge], axis=1)
    seg_start = lax.cummax(jnp.where(start, pos, 0), axis=1)
    seg_end = lax.cummin(jnp.where(end, pos, t - 1), axis=1, reverse=True)
    return DocSpans(start=seg_start, length=seg_end - seg_start + 1, within=pos - seg_start)


def slot_layout(segment_ids: jax.Array, chunk_size: int, dtype) -> SlotLayout:
    """The slot layout of packed documents (module docstring).

    Args:
      segment_ids: `[B, T]` integers; a new document wherever the id changes.
      chunk_size: C.
      dtype: dtype of `keep`.
    """
    b, t = segment_ids.shape
    c = chunk_size
    n = t // c
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg_start, length, within = doc_spans(segment_ids)
    chunk, off = within // c, within % c
    first_doc = seg_start == 0
    complete = (chunk + 1) * c <= length
    slot_starts = jnp.cumsum(complete & (off == 0), axis=1, dtype=jnp.int32)
    slot = slot_starts - 1
    resets = complete & (chunk == 0) & ~first_doc
    own_reader = complete & ~resets
    # A tail's next slot is the number of complete chunks that start before it.
    tail_reader = ~complete & (first_doc | (chunk >= 1))

    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    delta_idx = jnp.full((b, n, c), t, jnp.int32)
    delta_idx = delta_idx.at[rows, jnp.where(complete, slot, n), off].set(pos, mode="drop")
    keep = jnp.ones((b, n), dtype)
    keep = keep.at[rows, jnp.where(resets & (off == 0), slot, n)].set(0, mode="drop")
    read_slot = jnp.where(own_reader, slot, jnp.where(tail_reader, slot_starts, n + 1))
    read_idx = jnp.full((b, n + 1, c), t, jnp.int32)
    read_idx = read_idx.at[rows, read_slot, off].set(pos, mode="drop")
    last_continues = first_doc[:, -1] | (length[:, -1] >= c)
    return SlotLayout(
        delta_idx=delta_idx.reshape(b, n * c),
        keep=keep,
        read_idx=read_idx[:, :n].reshape(b, n * c),
        last_read_idx=read_idx[:, n],
        last_continues=last_continues,
    )


def gather_time(x: jax.Array, idx: jax.Array) -> jax.Array:
    """`x: [B, S, ...]`, `idx: [B, L]` -> `[B, L, ...]` (`x[b, idx[b, l]]`), 0 where `idx >= S`."""
    rows = jnp.arange(x.shape[0])[:, None]
    return x.at[rows, idx].get(mode="fill", fill_value=0)


def scatter_time(x: jax.Array, idx: jax.Array, t: int) -> jax.Array:
    """Inverse of `gather_time` for distinct indices: `x: [B, L, ...]` placed at `idx: [B, L]`
    of a zero `[B, t, ...]` (entries with `idx >= t` dropped). A scatter-add, so that its
    transpose is the gather."""
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.zeros((x.shape[0], t, *x.shape[2:]), x.dtype).at[rows, idx].add(x, mode="drop")
