"""The memory-lean custom VJP of LaCT (`backward="custom"`, SPEC 3.2 "Manual backward").

Autodiff of the chunk scan keeps every chunk's activations (`A`, `Bm`, `P`, the apply's hidden
layer, the Newton-Schulz iterates: a dozen `[B, H, C, Dh]` arrays per chunk). This VJP keeps
only the chunk-boundary states from the forward (`w0, w1, w2` and the momentum buffers), or
with `checkpoint_group=G` only every G-th of them, and its backward walks the chunks in
reverse:

1. (with G > 1) rebuild the states entering the group's chunks from the group's saved state,
   running only the update (the reads are not needed to rebuild a state);
2. for each chunk, last first: recompute the chunk step from its entering state and pull the
   cotangents of its output and of the state after it back through weight norm, Muon,
   momentum, the inner gradient (the gradient of the gradient) and the read, giving the
   cotangents of its tokens, of its rates, of the weight-norm targets and of the state before
   it. `jax.vjp` of the chunk step does this pull: it lives inside the reverse loop's body, so
   only one chunk's activations are ever live.

Memory: `n / G` (+ G while a group is rebuilt) states and one chunk's activations, against
`n` chunks' activations for autodiff. Compute: the forward, then per chunk the step once more
and its VJP (about 4x the forward against 3x for autodiff), plus one update per chunk to
rebuild states when G > 1.

Token arrays stay `[B, T, ...]`: chunks are fetched with dynamic slices and the output and
every token cotangent are written into one carried buffer each, in place, so no chunked or
transposed copy of the sequence is made.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.lact.autodiff import autodiff_reads, put_chunk, read_tail, take_chunk
from ttt_jax.ops.lact.math import (
    Chunk,
    ChunkConfig,
    FastState,
    chunk_step,
    update_state,
)


def _group_size(n: int, cfg: ChunkConfig) -> int:
    return max(1, min(cfg.checkpoint_group or 1, n))


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _forward(state, inputs, ref_norms, n, cfg):
    """Returns `(o, final state, (saved states [n_groups, ...], saved state of the rest))`."""
    c, t = cfg.chunk_size, inputs.q.shape[1]
    g = _group_size(n, cfg)

    def body(carry, j):
        s, o = carry
        s, o_j = chunk_step(s, take_chunk(inputs, j * c, c), ref_norms, cfg)
        return (s, lax.dynamic_update_slice_in_dim(o, o_j, j * c, axis=1)), None

    def group(carry, first):
        out, _ = lax.scan(body, carry, first + jnp.arange(g))
        return out, carry[0]

    n_groups, rest = divmod(n, g)
    carry = (state, jnp.zeros_like(inputs.q))
    saved = saved_rest = None
    if n_groups:
        carry, saved = lax.scan(group, carry, g * jnp.arange(n_groups))
    if rest:
        saved_rest = carry[0]
        carry, _ = lax.scan(body, carry, n_groups * g + jnp.arange(rest))
    state, o = carry
    if n * c < t:
        o = lax.dynamic_update_slice_in_dim(
            o, read_tail(state[0], inputs.q, n * c, cfg.compute_dtype), n * c, axis=1
        )
    return o, state, (saved, saved_rest)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _custom(state, inputs, ref_norms, n, cfg):
    o, state, _ = _forward(state, inputs, ref_norms, n, cfg)
    return o, state


def _custom_fwd(state, inputs, ref_norms, n, cfg):
    o, final, saved = _forward(state, inputs, ref_norms, n, cfg)
    has_tail = n * cfg.chunk_size < inputs.q.shape[1]
    return (o, final), (inputs, ref_norms, saved, final[0] if has_tail else None)


def _custom_bwd(n, cfg, res, cts):
    inputs, ref_norms, (saved, saved_rest), final_ws = res
    g_o, g_state = cts
    c, cd = cfg.chunk_size, cfg.compute_dtype
    g = _group_size(n, cfg)
    grads = jax.tree.map(jnp.zeros_like, inputs)
    g_norms = jax.tree.map(jnp.zeros_like, ref_norms)

    if final_ws is not None:
        # The partial chunk reads the final state: its cotangent joins the final state's.
        q_tail = inputs.q[:, n * c :]
        _, vjp = jax.vjp(lambda ws, q: read_tail(ws, q, 0, cd), final_ws, q_tail)
        g_ws, g_q_tail = vjp(g_o[:, n * c :])
        g_state = (_add(g_state[0], g_ws), g_state[1])
        grads = grads._replace(q=lax.dynamic_update_slice_in_dim(grads.q, g_q_tail, n * c, axis=1))

    def back(carry, xs):
        g_s, grads, g_norms = carry
        j, s_j = xs
        chunk = take_chunk(inputs, j * c, c)
        _, vjp = jax.vjp(lambda s, ch, rn: chunk_step(s, ch, rn, cfg), s_j, chunk, ref_norms)
        g_s, g_chunk, g_rn = vjp((g_s, lax.dynamic_slice_in_dim(g_o, j * c, c, axis=1)))
        return (g_s, put_chunk(grads, g_chunk, j * c), _add(g_norms, g_rn)), None

    def rebuild(s, first, length):
        """States entering chunks `first .. first + length - 1`, stacked, from the first."""
        if length == 1:
            return jax.tree.map(lambda x: x[None], s)

        def fwd(s, j):
            s = update_state(s, take_chunk(inputs, j * c, c), ref_norms, cfg)
            return s, s

        _, after = lax.scan(fwd, s, first + jnp.arange(length - 1))
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), s, after)

    def back_group(carry, xs, length):
        first, s = xs
        states = rebuild(s, first, length)
        carry, _ = lax.scan(back, carry, (first + jnp.arange(length), states), reverse=True)
        return carry, None

    carry = (g_state, grads, g_norms)
    n_groups, rest = divmod(n, g)
    if rest:
        carry, _ = back_group(carry, (n_groups * g, saved_rest), rest)
    if n_groups:
        carry, _ = lax.scan(
            functools.partial(back_group, length=g),
            carry,
            (g * jnp.arange(n_groups), saved),
            reverse=True,
        )
    g_state, grads, g_norms = carry
    return g_state, grads, g_norms


_custom.defvjp(_custom_fwd, _custom_bwd)


def lact_reads(
    state: FastState, inputs: Chunk, ref_norms, *, n: int, cfg: ChunkConfig, backward: str
) -> tuple[jax.Array, FastState]:
    """Every token's read of the fast weight, chunk by chunk (`math.py` for the math).

    Args:
      state: `(ws, ms)` entering the first chunk, state dtype.
      inputs: the whole sequence (`Chunk` of `[B, T, H, ...]` arrays).
      ref_norms: `(n0, n1, n2)` row norms of the slow weights (`[H, Dh]`, `[H, D]`, `[H, Dh]`).
      n: complete chunks, `T // C`.
      cfg: static settings.
      backward: "custom" (this module's VJP) or "autodiff" (`autodiff.autodiff_reads`).

    Returns:
      `o: [B, T, H, D]` in q's dtype and the state after the last complete chunk.
    """
    if backward == "custom":
        return _custom(state, inputs, ref_norms, n, cfg)
    return autodiff_reads(state, inputs, ref_norms, n, cfg)
