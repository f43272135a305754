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
  with within-document updates only: one constant state for all of them, so no state needs
  carrying. `const_reads` computes their dual form block by block (C tokens from position 0),
  each block's queries against a window of 2C tokens (the block before and itself), which holds
  every earlier token of any document shorter than C that reaches into the block.

Reads that no row needs are skipped with `lax.cond` (predicates over the whole batch): the tail
read in slots where no row has a tail, the step in slots where all rows are padding, a block of
constant reads where no row has one. So a row of long documents costs the unsegmented path's
matmuls plus one tail read per document. Each token's output comes from exactly one of these
reads and is scattered back to its position; `segment_ids` with one document give the
unsegmented path's outputs and state bit for bit (its gradients to rounding).

Memory: both scans run through `chunked_scan`, so `checkpoint_group` and `remat_policy` act on
them as they do without segments. The own tokens of the slots are gathered once into the
unsegmented path's layout (a reordered copy of q, k, v, as that path makes); tails and windows
are gathered inside the scans, outside the conds (their transposes then add into the
cotangents in place), and the tail and window reads are rematerialised in the backward, so
what they keep per slot is their inputs. Compiled fwd+bwd temp memory on abstract shapes (CPU,
B=1, H=4, D=64, C=16, T=8192; static, so whatever the layout): TTT-Linear 367 MiB without remat and
148 MiB with `checkpoint_group=4` (unsegmented: 135 and 34 MiB); TTT-MLP 1907 and 220 MiB
(unsegmented: 1165 and 100 MiB); all linear in T.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.core.numerics import matmul
from ttt_jax.ops.core.scan import chunked_scan
from ttt_jax.ops.core.segments import (
    SlotLayout,
    doc_spans,
    gather_time,
    scatter_time,
    slot_layout,
)


class Band(NamedTuple):
    """The constant readers of one block of C tokens and the window they read from.

    Block n holds tokens `[n C, (n + 1) C)`; its window is the block before it and itself,
    `[(n - 1) C, (n + 1) C)` (2C tokens, zeros before position 0), which holds every earlier
    token of any document shorter than C that has a token in block n.

    Attributes:
      pairs: `[B, 1, C, 2C]` float, 1 where token i of the block reads window token j (same
        document, j not after i, i a constant reader).
      scale: `[B, 1, C]` `token_scale` at each reader's position in its document (0 for tokens
        that are not constant readers).
    """

    pairs: jax.Array
    scale: jax.Array


def band_rates(eta: jax.Array, band: Band) -> jax.Array:
    """`E[i, j] = token_scale[pos_i] * eta[j]` on the band: window rates `eta: [B, H, 2C]` ->
    `E: [B, H, C, 2C]`."""
    return band.scale[..., None] * band.pairs * eta[..., None, :]


def band_dual(a, b, g, e, compute_dtype) -> jax.Array:
    """`sum_j E[i, j] (a_i . b_j + 1) g_j`: the dual-form correction of one inner layer for
    the block's queries `a: [B, H, C, X]` from the window's `b: [B, H, 2C, X]` and
    `g: [B, H, 2C, Y]` (`E` from `band_rates`)."""
    attn = e * (matmul("bhix,bhjx->bhij", a, b, compute_dtype) + 1.0)
    return matmul("bhij,bhjy->bhiy", attn, g, compute_dtype)


def _const_reads_scan(
    const_reads, xs, spans, reader, token_scale, c, *, checkpoint_group, remat_policy, unroll
):
    """The constant readers' outputs `[B, T, H, D]` (zeros elsewhere): a scan over blocks of C,
    each reading its window (`Band`), skipped where no row has a reader in the block."""
    b, t = reader.shape
    nb = -(-t // c)
    causal = jnp.arange(2 * c)[None, :] <= c + jnp.arange(c)[:, None]  # [C, 2C]
    ints = (spans.start, reader, spans.within)

    def block(n, win, ints_win):
        # Positions outside the row gather as zeros: start 0 is no reader's document (a
        # reader's document starts after position 0), and no reader.
        (s_win, reader_win, pos_win), own = ints_win, slice(c, 2 * c)
        own_reader = reader_win[:, own]
        pairs = (s_win[:, own, None] == s_win[:, None, :]) & causal & own_reader[..., None]
        scale = jnp.where(own_reader, token_scale[jnp.clip(pos_win[:, own], 0, c - 1)], 0.0)
        band = Band(
            pairs=pairs[:, None].astype(token_scale.dtype),
            scale=scale[:, None].astype(token_scale.dtype),
        )
        q_win, k_win, v_win, eta_win = (jnp.swapaxes(x, 1, 2) for x in win)
        return const_reads(q_win[:, :, own], k_win, v_win, eta_win, band)

    def window_of(n):  # tokens [(n - 1) C, (n + 1) C) of every row (index t: outside)
        idx = (n - 1) * c + jnp.arange(2 * c)
        idx = jnp.broadcast_to(jnp.where((idx >= 0) & (idx < t), idx, t), (b, 2 * c))
        return tuple(gather_time(x, idx) for x in xs), tuple(gather_time(x, idx) for x in ints)

    struct = jax.eval_shape(lambda: block(0, *window_of(0)))

    def maybe_block(_, x):
        # The gathers stay outside the cond: their transposes then add into the cotangents of
        # q, k, v in place, and the cond's operands are one window.
        n, needed = x
        win, ints_win = window_of(n)
        zeros = functools.partial(jnp.zeros, struct.shape, struct.dtype)
        return None, lax.cond(
            needed, jax.checkpoint(lambda w, i: block(n, w, i)), lambda w, i: zeros(), win, ints_win
        )

    needed = jnp.any(jnp.pad(reader, [(0, 0), (0, nb * c - t)]).reshape(b, nb, c), axis=(0, 2))
    _, out = chunked_scan(
        maybe_block,
        None,
        (jnp.arange(nb), needed),
        checkpoint_group=checkpoint_group,
        remat_policy=remat_policy,
        unroll=unroll,
    )  # [N, B, H, C, D]
    out = jnp.swapaxes(jnp.moveaxis(out, 0, 1), 2, 3)
    return out.reshape(b, nb * c, *out.shape[3:])[:, :t]


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
      const_reads: `(q, k, v, eta, band) -> out`, the outputs `[B, H, C, D]` of one block's
        queries `q: [B, H, C, D]` reading the reset state with the updates of the window's
        tokens `k, v: [B, H, 2C, D]`, `eta: [B, H, 2C]` (as given: the family casts it as its
        step does) on the pairs of `band` (`band_rates`, `band_dual`); only its outputs at
        constant readers are used.
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
        tail = take(tail_j)  # outside the cond, so that its transpose adds in place
        out_tail = lax.cond(
            has_tail, jax.checkpoint(lambda s, x: step(s, x)[1]), lambda s, x: zeros_out(), s, tail
        )
        s_in = jax.tree.map(
            lambda r, w: jnp.where(reset_j.reshape(-1, *[1] * (w.ndim - 1)), r, w), reset, s
        )
        s_new, out_own = lax.cond(has_own, lambda: step(s_in, own), lambda: (s_in, zeros_out()))
        return s_new, (out_own, out_tail)

    def slots(idx):  # [B, N C] -> the tokens as the unsegmented path lays them out
        return tuple(
            jnp.swapaxes(
                jnp.moveaxis(gather_time(x, idx).reshape(b, n, c, *x.shape[2:]), 1, 0), 2, 3
            )
            for x in xs
        )

    def by_slot(idx):  # [B, N C] -> [N, B, C]
        return jnp.moveaxis(idx.reshape(b, n, c), 1, 0)

    def unslot(o, idx):  # [N, B, H, C, D] at idx [B, N C] -> [B, T, H, D]
        o = jnp.swapaxes(jnp.moveaxis(o, 0, 1), 2, 3)
        return scatter_time(o.reshape(b, n * c, *o.shape[3:]), idx, t)

    parts = []
    if n:
        scan_xs = (
            slots(lay.delta_idx),
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
    out = out + _short_docs(
        const_reads, xs, segment_ids, token_scale, c, out.dtype,
        checkpoint_group=checkpoint_group, remat_policy=remat_policy, unroll=unroll,
    )  # fmt: skip
    return out, _final_state(lay, state, reset)


def _short_docs(const_reads, xs, segment_ids, token_scale, c, dtype, **knobs) -> jax.Array:
    """The outputs `[B, T, H, D]` of the documents with no complete mini-batch other than the
    call's first (zeros elsewhere): constant reads (`_const_reads_scan`)."""
    spans = doc_spans(segment_ids)
    short = (spans.start > 0) & (spans.length < c)
    out_short = _const_reads_scan(const_reads, xs, spans, short, token_scale, c, **knobs)
    return jnp.where(short[..., None, None], out_short.astype(dtype), 0.0)


def _final_state(lay, state, reset):
    """The carried state is the last document's only if it had a complete mini-batch (or is
    the call's first); a later document without one ends where it started (`reset`)."""
    return jax.tree.map(
        lambda r, w: jnp.where(lay.last_continues.reshape(-1, *[1] * (w.ndim - 1)), w, r),
        reset,
        state,
    )


# The bits of a segmented TTT kernel's per-mini-batch flags (`kernel_layout`).
RESET = 1  # the mini-batch starts from the reset state, not the carried one
COMMIT = 2  # its update is written back into the state (else it is only read)


def kernel_layout(segment_ids: jax.Array, c: int) -> tuple[SlotLayout, jax.Array, jax.Array]:
    """The sequence a segmented TTT kernel walks: the slot scan of `run_packed` flattened.

    Slot j of the slot layout becomes two mini-batches: its tail reads (the previous
    document's trailing partial mini-batch, read with the state entering the slot, no update)
    and its own tokens (a reset first where the slot starts a document, then the update), then
    one more mini-batch for the reads after the last slot: `2 N + 1` mini-batches, N = T // C.

    Returns:
      `(layout, idx [B, (2 N + 1) C], flags [B, 2 N + 1] int32)`: the slot layout, the token
      at each position of the kernel's sequence (T: padding, gathered as zeros, whose zero
      rates leave the state unchanged), and each mini-batch's `RESET` / `COMMIT` bits.
    """
    b, t = segment_ids.shape
    n = t // c
    lay = slot_layout(segment_ids, c, jnp.float32)
    tail_idx = jnp.where(lay.read_idx == lay.delta_idx, t, lay.read_idx)
    pairs = jnp.stack([tail_idx.reshape(b, n, c), lay.delta_idx.reshape(b, n, c)], axis=2)
    idx = jnp.concatenate([pairs.reshape(b, 2 * n * c), lay.last_read_idx], axis=1)
    own = jnp.where(lay.keep == 0, RESET | COMMIT, COMMIT).astype(jnp.int32)  # [B, N]
    flags = jnp.stack([jnp.zeros_like(own), own], axis=2).reshape(b, 2 * n)
    flags = jnp.concatenate([flags, jnp.zeros((b, 1), jnp.int32)], axis=1)
    return lay, idx, flags


def run_packed_kernel(
    kernel: Callable[..., tuple[jax.Array, Any]],
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
) -> tuple[jax.Array, Any]:
    """`run_packed` on a TTT kernel: the same reads, the same outputs and final state.

    The kernel walks the flattened slot sequence of `kernel_layout` (q, k, v, eta gathered
    into it, so a copy of each of `2 N + 1` mini-batches), resetting and committing as its
    flags say; its outputs are scattered back to the tokens' positions. Documents with no
    complete mini-batch other than the call's first are read by the family's `const_reads` in
    XLA (`_short_docs`), as in `run_packed`.

    Args:
      kernel: `(q, k, v, eta, state, flags, reset) -> (o, final_state)` on the kernel's
        sequence (`q: [B, S, H, D]`, S = (2 N + 1) C; `flags: [B, 2 N + 1]`).
      const_reads, state, q, k, v, eta, segment_ids, token_scale, mini_batch_size: as for
        `run_packed`.
      reset: the state later documents restart from, fields `[H, ...]` (the slow weights).

    Returns:
      `(out [B, T, H, D], state of the last document after its last complete mini-batch)`.
    """
    t = q.shape[1]
    c = mini_batch_size
    lay, idx, flags = kernel_layout(segment_ids, c)
    xs = (q, k, v, eta)
    o, final = kernel(*(gather_time(x, idx) for x in xs), state, flags, reset)
    out = scatter_time(o, idx, t)
    out = out + _short_docs(
        const_reads, xs, segment_ids, token_scale, c, out.dtype,
        checkpoint_group=None, remat_policy=None, unroll=1,
    )  # fmt: skip
    full_reset = jax.tree.map(
        lambda r, s: jnp.broadcast_to(r, s.shape).astype(s.dtype), reset, final
    )
    return out, _final_state(lay, final, full_reset)
