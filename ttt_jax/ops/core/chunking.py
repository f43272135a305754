"""Cutting `[B, T, ...]` sequences into chunks and putting them back.

Every recurrent op splits its time axis into `n_full` complete chunks, scanned with state
updates, and at most one trailing partial chunk, which is read (outputs exact) but never
updates the state (SPEC 2). The partial chunk is zero-padded to the chunk size so that it runs
through the same step function; each op's math guarantees padded positions cannot reach the
real ones (causal masks within a chunk).
"""

from __future__ import annotations

import jax.numpy as jnp


def split_time(x: jnp.ndarray, chunk_size: int) -> tuple[jnp.ndarray | None, jnp.ndarray | None]:
    """Splits `x: [B, T, ...]` into chunks along T.

    Returns:
      `(full, tail)`: `full` is `[n_full, B, C, ...]` (None if T < C) and `tail` the trailing
      partial chunk zero-padded to `[B, C, ...]` (None if C divides T).
    """
    b, t = x.shape[:2]
    n_full, rest = divmod(t, chunk_size)
    full = None
    if n_full:
        full = x[:, : n_full * chunk_size].reshape(b, n_full, chunk_size, *x.shape[2:])
        full = jnp.moveaxis(full, 1, 0)
    tail = None
    if rest:
        pad = [(0, 0), (0, chunk_size - rest)] + [(0, 0)] * (x.ndim - 2)
        tail = jnp.pad(x[:, n_full * chunk_size :], pad)
    return full, tail


def merge_time(full: jnp.ndarray | None, tail: jnp.ndarray | None, t: int) -> jnp.ndarray:
    """Inverse of `split_time` for outputs: `[n, B, C, ...]` and `[B, C, ...]` -> `[B, T, ...]`."""
    parts = []
    if full is not None:
        n, b, c = full.shape[:3]
        parts.append(jnp.moveaxis(full, 0, 1).reshape(b, n * c, *full.shape[3:]))
    if tail is not None:
        parts.append(tail)
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return out[:, :t]
