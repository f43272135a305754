"""Walking LaCT's chunks: token slicing shared by both backwards, and the autodiff form.

`autodiff_reads` is the plain form (`backward="autodiff"`): the sequence is reshaped into
chunks and `chunked_scan` runs `chunk_step` over them, so JAX differentiates the scan and keeps
every chunk's activations (`[B, H, C, Dh]` arrays, a dozen per chunk) unless
`checkpoint_group` rematerialises them. `vjp.py` holds the memory-lean custom backward.

Both forms read a trailing partial chunk (`T mod C` tokens) with the state after the last
complete chunk and never update the state with it (SPEC 2). Reading is per token (no mixing
across the chunk), so the partial chunk needs no padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.core.chunking import merge_time, split_time
from ttt_jax.ops.core.scan import chunked_scan
from ttt_jax.ops.lact.math import Chunk, ChunkConfig, FastState, apply_fast_weights, chunk_step


def take_chunk(inputs: Chunk, start: jax.Array | int, length: int) -> Chunk:
    """Tokens `[start, start + length)` of every `[B, T, ...]` input (None stays None)."""
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, length, axis=1), inputs)


def put_chunk(buffers: Chunk, values: Chunk, start: jax.Array | int) -> Chunk:
    """Writes `values` (`[B, C, ...]`) into `buffers` (`[B, T, ...]`) at token `start`."""
    return jax.tree.map(
        lambda b, x: lax.dynamic_update_slice_in_dim(b, x.astype(b.dtype), start, axis=1),
        buffers,
        values,
    )


def read_tail(ws: tuple[jax.Array, ...], q: jax.Array, start: int, cd, bd=None) -> jax.Array:
    """`f_W(q)` of the tokens from `start` on (the partial chunk), in q's dtype."""
    return apply_fast_weights(ws, q[:, start:], cd, bd).astype(q.dtype)


def autodiff_reads(
    state: FastState, inputs: Chunk, ref_norms, n: int, cfg: ChunkConfig
) -> tuple[jax.Array, FastState]:
    """LaCT over `n` complete chunks and the partial rest, for plain autodiff.

    Args:
      state: `(ws, ms)` entering the first chunk (`math.FastState`).
      inputs: the whole sequence, `[B, T, H, ...]` (`math.Chunk`).
      ref_norms: row norms of the slow weights (weight-norm targets).
      n: number of complete chunks, `T // C`.
      cfg: static settings; `checkpoint_group` and `remat_policy` go to `chunked_scan`.

    Returns:
      `o: [B, T, H, D]` in q's dtype and the state after the last complete chunk.
    """
    c, t = cfg.chunk_size, inputs.q.shape[1]
    parts = []
    if n:
        chunks = jax.tree.map(lambda x: split_time(x, c)[0], inputs)  # [n, B, C, H, ...]
        state, o = chunked_scan(
            lambda s, ch: chunk_step(s, ch, ref_norms, cfg),
            state,
            chunks,
            checkpoint_group=cfg.checkpoint_group,
            remat_policy=cfg.remat_policy,
        )
        parts.append(merge_time(o, None, n * c))
    if n * c < t:
        parts.append(read_tail(state[0], inputs.q, n * c, cfg.compute_dtype, cfg.backward_dtype))
    o = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return o, state
