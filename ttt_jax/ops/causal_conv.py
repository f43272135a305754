"""Causal depthwise 1-D convolution over time, with an explicit carried history for streaming."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttt_jax.ops.core.numerics import wide_dtype
from ttt_jax.ops.core.segments import doc_spans


def causal_conv(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    history: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """`y[t] = bias + sum_j weight[j] * x[t - (K-1) + j]`, per channel.

    Args:
      x: `[B, T, C]`.
      weight: `[K, C]` taps, the last one multiplying the current step.
      bias: `[C]` or None.
      history: `[B, K-1, C]` inputs before `x[:, 0]` (a streaming call's carried tail); zeros
        when None, i.e. the sequence starts here.
      segment_ids: `[B, T]` integers, a new document wherever the id changes, or None. A tap
        never reads an earlier document (every document after the first starts from zero
        history; the first one continues from `history`).

    Returns:
      `[B, T, C]` in the dtype of x (accumulated in fp32, fp64 when x or the taps are fp64).
    """
    k = weight.shape[0]
    b, t, c = x.shape
    if history is None:
        history = jnp.zeros((b, k - 1, c), x.dtype)
    wd = wide_dtype(x.dtype, weight.dtype)
    xp = jnp.concatenate([history.astype(x.dtype), x], axis=1).astype(wd)
    w = weight.astype(wd)
    taps = [xp[:, j : j + t] for j in range(k)]
    if segment_ids is not None:
        # Tap j reaches back k - 1 - j steps: inside the document, or before the row's first.
        # Masking the inputs (not the products) keeps one document's sums the plain ones.
        spans = doc_spans(segment_ids)
        reach = [(spans.within >= k - 1 - j) | (spans.start == 0) for j in range(k)]
        taps = [jnp.where(r[..., None], x_j, 0.0) for r, x_j in zip(reach, taps, strict=True)]
    y = sum(w[j] * taps[j] for j in range(k))
    if bias is not None:
        y = y + bias.astype(wd)
    return y.astype(x.dtype)
