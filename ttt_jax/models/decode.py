"""Decoding through the blocks: every layer family's cache, one block and one period at a time.

The LM (`LM.prefill`, `LM.decode`) threads these caches through its layer scan. Per family:

- `attention`: the KV cache of `Attention` (fixed `max_length` buffers);
- `ttt_linear`, `ttt_mlp`, `lact`: the streaming caches of `TTTLayer` / `LaCTLayer` (fast
  weights at the last chunk boundary and the unfinished chunk; LaCT's window keys), which take
  any number of tokens;
- `inplace_ttt`: `InPlaceMLP.prefill` for the prompt, then `decode` one token at a time (a
  piece of several tokens runs token by token);
- `swiglu`, `npt`: no state (`None`), the layer on the new tokens alone.

A cache of a block is a dict `{"mixer": ..., "mlp": ..., "branch": ...}` (the branch of a
retrofitted block, `ttt_jax.models.block`); a period's is the list of its blocks'. Feeding a
sequence in pieces gives the outputs of one call on the whole sequence (tests/models/
test_generate.py, per family).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ttt_jax.ops.core import rms_norm, wide_dtype


def _attention(layer, x, cache, *, max_length, **_):
    if cache is None:
        return layer.prefill(x, max_length)
    return layer.decode(x, cache)


def _streaming(layer, x, cache, **_):
    # TTTLayer / LaCTLayer: `cache=None` starts a fresh sequence.
    return layer.decode(x, cache)


def _inplace(layer, x, cache, *, embeddings, **_):
    if cache is None:
        return layer.prefill(x, embeddings)
    ys = []
    for t in range(x.shape[1]):  # its decode takes one token (the chunk fills row by row)
        y, cache = layer.decode(x[:, t : t + 1], cache, embeddings[:, t : t + 1])
        ys.append(y)
    return jnp.concatenate(ys, axis=1), cache


def _stateless(layer, x, cache, **_):
    del cache
    return layer(x), None


def _npt(layer, x, cache, *, a, **_):
    del cache
    return layer(x, a)[0], None


# Family name -> `(layer, x, cache or None, *, max_length, embeddings, a) -> (y, cache)`;
# `cache=None` is the prompt (an empty cache before it).
STEPS: dict[str, Callable[..., tuple[jax.Array, Any]]] = {
    "attention": _attention,
    "ttt_linear": _streaming,
    "ttt_mlp": _streaming,
    "lact": _streaming,
    "swiglu": _stateless,
    "inplace_ttt": _inplace,
    "npt": _npt,
}


def _step(name: str, layer, x, cache, **side):
    if name not in STEPS:
        raise ValueError(f"layer family {name!r} has no decoding step (ttt_jax.models.decode)")
    return STEPS[name](layer, x, cache, **side)


def block_step(block, x, embeddings, cache: dict | None, *, max_length: int):
    """One block (`ttt_jax.models.block.Block`) on new tokens, as its `__call__` computes them.

    Args:
      block: the block.
      x: `[B, L, d]` residual stream of the new tokens (compute dtype).
      embeddings: `[B, L, d]` their token embeddings.
      cache: the block's cache after the earlier tokens, None for a prompt.
      max_length: tokens the attention caches hold (prompt and continuation).

    Returns:
      `[B, L, d]` and the block's cache after these tokens.
    """
    c = block.config
    cd = c.mixed_precision.compute_dtype
    cache = cache or {}
    side = dict(max_length=max_length, embeddings=embeddings)
    xn = rms_norm(x, block.mixer_norm[...], c.norm_eps).astype(cd)
    new = {}
    m, new["mixer"] = _step(block.mixer_name, block.mixer, xn, cache.get("mixer"), **side)
    branch = getattr(block, "branch_name", None)
    if branch is not None:
        b, new["branch"] = _step(branch, block.branch, xn, cache.get("branch"), **side)
        w = wide_dtype(m.dtype)
        gate = block.branch_gate[...].astype(w)
        m = m.astype(w) + gate * b.astype(w)
    m = m.astype(cd)
    h = x + m.astype(x.dtype)
    hn = rms_norm(h, block.mlp_norm[...], c.norm_eps).astype(cd)
    y, new["mlp"] = _step(block.mlp_name, block.mlp, hn, cache.get("mlp"), a=m, **side)
    return h + y.astype(cd).astype(x.dtype), new


def group_step(group, x, embeddings, cache: list | None, *, max_length: int):
    """A period's blocks (`BlockGroup`) in order: `(x, [block caches])` (as `block_step`)."""
    caches = []
    for i, block in enumerate(group.blocks):
        x, new = block_step(
            block, x, embeddings, None if cache is None else cache[i], max_length=max_length
        )
        caches.append(new)
    return x, caches
