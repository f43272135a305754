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

Where chunk j's tokens come from and where its outputs go is a *walk* (`DenseWalk`: the grid of
C from position 0; `packed.PackedWalk`: the slots of packed documents, gathered and scattered
by index), a static argument, so both layouts share this forward and backward.
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


class DenseWalk:
    """How the custom VJP walks chunks on the grid of C tokens from position 0 (no documents).

    A walk tells `_forward` and `_custom_bwd` where chunk j's inputs come from and where its
    outputs and token cotangents go; `packed.PackedWalk` is the same for packed documents. Its
    arguments: `inputs` (the `[B, T, ...]` tokens), `layout` (integer arrays of the walk, None
    here), `params` (the differentiable non-token arguments: `(ref_norms, slow weights)`, the
    slow weights None here). Instances are static (`custom_vjp` nondiff arguments).
    """

    def fetch(self, inputs: Chunk, layout, j, c: int):
        """Chunk j's differentiable inputs and its static flags (None)."""
        return take_chunk(inputs, j * c, c), None

    def step(self, s, x, flags, params, cfg: ChunkConfig):
        return chunk_step(s, x, params[0], cfg)

    def update(self, s, x, flags, params, cfg: ChunkConfig):
        return update_state(s, x, params[0], cfg)

    def write(self, o, out, layout, j, c: int):
        return lax.dynamic_update_slice_in_dim(o, out, j * c, axis=1)

    def out_ct(self, g_o, layout, j, c: int):
        return lax.dynamic_slice_in_dim(g_o, j * c, c, axis=1)

    def put_ct(self, grads: Chunk, g_x: Chunk, layout, j, c: int) -> Chunk:
        return put_chunk(grads, g_x, j * c)

    def has_last(self, t: int, n: int, c: int) -> bool:
        """Whether tokens read the state after the last chunk (the trailing partial chunk)."""
        return n * c < t

    def write_last(self, o, ws, inputs: Chunk, layout, n: int, cfg: ChunkConfig):
        c = cfg.chunk_size
        tail = read_tail(ws, inputs.q, n * c, cfg.compute_dtype, cfg.backward_dtype)
        return lax.dynamic_update_slice_in_dim(o, tail, n * c, axis=1)

    def back_last(self, ws, inputs: Chunk, layout, g_o, n: int, cfg: ChunkConfig):
        """The last read's cotangents: of `ws`, and of its tokens' q."""
        c, cd, bd = cfg.chunk_size, cfg.compute_dtype, cfg.backward_dtype
        q_tail = inputs.q[:, n * c :]
        _, vjp = jax.vjp(lambda ws, q: read_tail(ws, q, 0, cd, bd), ws, q_tail)
        return vjp(g_o[:, n * c :])

    def put_last(self, grads: Chunk, g_q, layout, n: int, c: int) -> Chunk:
        return grads._replace(q=lax.dynamic_update_slice_in_dim(grads.q, g_q, n * c, axis=1))


DENSE = DenseWalk()


def _group_size(n: int, cfg: ChunkConfig) -> int:
    return max(1, min(cfg.checkpoint_group or 1, n))


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _forward(state, inputs, params, layout, n, cfg, walk):
    """Returns `(o, final state, (saved states [n_groups, ...], saved state of the rest))`."""
    c, t = cfg.chunk_size, inputs.q.shape[1]
    g = _group_size(n, cfg)

    def body(carry, j):
        s, o = carry
        x, flags = walk.fetch(inputs, layout, j, c)
        s, out = walk.step(s, x, flags, params, cfg)
        return (s, walk.write(o, out, layout, j, c)), None

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
    if walk.has_last(t, n, c):
        o = walk.write_last(o, state[0], inputs, layout, n, cfg)
    return o, state, (saved, saved_rest)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _custom(state, inputs, params, layout, n, cfg, walk):
    o, state, _ = _forward(state, inputs, params, layout, n, cfg, walk)
    return o, state


def _custom_fwd(state, inputs, params, layout, n, cfg, walk):
    o, final, saved = _forward(state, inputs, params, layout, n, cfg, walk)
    has_last = walk.has_last(inputs.q.shape[1], n, cfg.chunk_size)
    return (o, final), (inputs, params, layout, saved, final[0] if has_last else None)


def _custom_bwd(n, cfg, walk, res, cts):
    inputs, params, layout, (saved, saved_rest), final_ws = res
    g_o, g_state = cts
    c = cfg.chunk_size
    g = _group_size(n, cfg)
    grads = jax.tree.map(jnp.zeros_like, inputs)
    g_params = jax.tree.map(jnp.zeros_like, params)

    if final_ws is not None:
        # The last read (the partial chunk) reads the final state: its cotangent joins the
        # final state's.
        g_ws, g_q = walk.back_last(final_ws, inputs, layout, g_o, n, cfg)
        g_state = (_add(g_state[0], g_ws), g_state[1])
        grads = walk.put_last(grads, g_q, layout, n, c)

    def back(carry, xs):
        g_s, grads, g_params = carry
        j, s_j = xs
        x, flags = walk.fetch(inputs, layout, j, c)
        _, vjp = jax.vjp(lambda s, x, p: walk.step(s, x, flags, p, cfg), s_j, x, params)
        g_s, g_x, g_p = vjp((g_s, walk.out_ct(g_o, layout, j, c)))
        return (g_s, walk.put_ct(grads, g_x, layout, j, c), _add(g_params, g_p)), None

    def rebuild(s, first, length):
        """States entering chunks `first .. first + length - 1`, stacked, from the first."""
        if length == 1:
            return jax.tree.map(lambda x: x[None], s)

        def fwd(s, j):
            x, flags = walk.fetch(inputs, layout, j, c)
            s = walk.update(s, x, flags, params, cfg)
            return s, s

        _, after = lax.scan(fwd, s, first + jnp.arange(length - 1))
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), s, after)

    def back_group(carry, xs, length):
        first, s = xs
        states = rebuild(s, first, length)
        carry, _ = lax.scan(back, carry, (first + jnp.arange(length), states), reverse=True)
        return carry, None

    carry = (g_state, grads, g_params)
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
    g_state, grads, g_params = carry
    return g_state, grads, g_params, None


_custom.defvjp(_custom_fwd, _custom_bwd)


def custom_reads(state, inputs, params, layout, *, n: int, cfg: ChunkConfig, walk):
    """The custom VJP over `n` chunks (or slots) as `walk` lays them out: `(o, final state)`.

    `params = (ref_norms, slow weights or None)`; `layout`: the walk's integer arrays (None
    for `DENSE`), given no cotangent.
    """
    return _custom(state, inputs, params, layout, n, cfg, walk)


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
        return custom_reads(state, inputs, (ref_norms, None), None, n=n, cfg=cfg, walk=DENSE)
    return autodiff_reads(state, inputs, ref_norms, n, cfg)
