"""Causal multi-head self-attention with RoPE: the function and the NNX mixer around it.

    q, k, v = x W_q, x W_k, x W_v                 [B, T, H, Dh]
    q, k <- RoPE(q, k, positions)
    o = softmax(q k^T / sqrt(Dh) + mask) v        causal, optional sliding window and segments
    y = o W_o

The mask is causal; `window=w` keeps the last w keys of each query (itself included);
`segment_ids` (packed documents) keep only keys of the query's own segment, so a packed
sequence gives each document the outputs it would get alone when positions restart per
segment (the model passes such positions).

`implementation` picks the kernel behind `jax.nn.dot_product_attention`: "xla", "cudnn", or
"auto" (cuDNN flash attention on a GPU for bf16/fp16 inputs with head_dim a multiple of 8 up to
128 and no segment mask, XLA otherwise: cuDNN takes a dense mask only as a materialised bias,
which costs the `[B, T, T]` memory flash attention exists to avoid).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layers.common import FP32, MixedPrecision, normal, param
from ttt_jax.ops.core import (
    check_choice,
    check_layer_input,
    check_optional_positive_int,
    check_positive_int,
    matmul,
)
from ttt_jax.ops.rope import rope

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def resolve_implementation(name: str, dtype, head_dim: int, masked: bool) -> str:
    """The kernel `auto` stands for on this backend (module docstring); others pass through."""
    check_choice("attention implementation", name, IMPLEMENTATIONS)
    if name != "auto":
        return name
    cudnn_ok = (
        jax.default_backend() == "gpu"
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
        and not masked
    )
    return "cudnn" if cudnn_ok else "xla"


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int | None = None,
    mask: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Causal softmax attention of projected, rotated heads, optionally after cached keys.

    The last T keys belong to the T queries, in order; the `S - T` keys before them (a decoding
    cache) come from the tokens just before, so query i sits at key position `S - T + i` and
    sees the keys at positions `<= S - T + i` (the last `window` of them with a window).

    Args:
      q: `[B, T, H, Dh]`; k, v: `[B, S, H, Dh]` with `S >= T`.
      window: keys per query, itself included; None attends to every earlier key.
      mask: optional extra `[B, 1, T, S]` boolean mask (segments), only with `S == T`.
      implementation: "xla", "cudnn" or "auto" (`resolve_implementation`).

    Returns:
      `[B, T, H, Dh]` in the dtype of q.
    """
    t, s = q.shape[1], k.shape[1]
    if s == t:
        impl = resolve_implementation(implementation, q.dtype, q.shape[-1], mask is not None)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=True,
            local_window_size=None if window is None else (window - 1, 0),
            implementation=impl,
        )
    if s < t or mask is not None:
        raise ValueError(
            f"attend: keys ({s}) must be at least as many as queries ({t}), and a mask is only "
            "taken without cached keys"
        )
    # jax's causal and window masks align the first query with the first key; with cached keys
    # in front the offset mask is explicit, and an explicit mask rules out cuDNN (module doc).
    query_pos = (s - t + jnp.arange(t))[:, None]
    key_pos = jnp.arange(s)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed = allowed & (query_pos - key_pos < window)
    return jax.nn.dot_product_attention(q, k, v, mask=allowed[None, None], implementation="xla")


def causal_attention(
    x: jax.Array,
    w_q: jax.Array,
    w_k: jax.Array,
    w_v: jax.Array,
    w_o: jax.Array,
    positions: jax.Array,
    rope_theta: float,
    compute_dtype,
    *,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Causal multi-head self-attention with RoPE on q and k.

    Args:
      x: `[B, S, d]` normalised input.
      w_q, w_k, w_v: `[d, H, Dh]` projections.
      w_o: `[H, Dh, d]` output projection.
      positions: `[S]` or `[B, S]` RoPE positions.
      rope_theta: RoPE base.
      compute_dtype: dtype of the matmuls (fp32 accumulation).
      window: sliding window (keys per query, itself included); None attends to all earlier keys.
      segment_ids: `[B, S]` integer document ids; a query sees keys of its own segment only.
      implementation: "xla", "cudnn" or "auto" (`resolve_implementation`).

    Returns:
      `[B, S, d]` in the compute dtype.
    """
    cd = compute_dtype

    def proj(w):
        return matmul("bsd,dhe->bshe", x, w, cd).astype(cd)

    q = rope(proj(w_q), positions, rope_theta)
    k = rope(proj(w_k), positions, rope_theta)
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, S, S]
    o = attend(q, k, proj(w_v), window=window, mask=mask, implementation=implementation)
    return matmul("bshe,hed->bsd", o, w_o, cd).astype(cd)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Shape of an attention mixer.

    Attributes:
      d_model: d, model width.
      num_heads: H.
      head_dim: Dh (even, for RoPE).
      window: sliding-window size in tokens, None for full causal attention.
      rope_theta: RoPE base.
      implementation: "auto", "xla" or "cudnn".
      precision: the mixed-precision policy.
    """

    d_model: int
    num_heads: int
    head_dim: int
    window: int | None = None
    rope_theta: float = 10000.0
    implementation: str = "auto"
    precision: MixedPrecision = FP32

    def __post_init__(self):
        check_positive_int("AttentionConfig.d_model", self.d_model)
        check_positive_int("AttentionConfig.num_heads", self.num_heads)
        check_positive_int("AttentionConfig.head_dim", self.head_dim)
        check_optional_positive_int("AttentionConfig.window", self.window)
        check_choice("AttentionConfig.implementation", self.implementation, IMPLEMENTATIONS)
        if self.head_dim % 2:
            raise ValueError(f"AttentionConfig.head_dim={self.head_dim} must be even for RoPE")


class Attention(nnx.Module):
    """Causal RoPE self-attention mixer: `[B, T, d] -> [B, T, d]`.

    Parameters (logical axes): `W_q, W_k, W_v: [d, H, Dh]` (embed, heads, head_dim) and
    `W_o: [H, Dh, d]` (heads, head_dim, embed), initialised `N(0, 1/fan_in)`.
    """

    def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h, e = config.d_model, config.num_heads, config.head_dim
        pd = config.precision.param_dtype
        axes = ("embed", "heads", "head_dim")
        self.W_q = param(rngs, normal(d**-0.5), (d, h, e), axes, pd)
        self.W_k = param(rngs, normal(d**-0.5), (d, h, e), axes, pd)
        self.W_v = param(rngs, normal(d**-0.5), (d, h, e), axes, pd)
        self.W_o = param(
            rngs, normal((h * e) ** -0.5), (h, e, d), ("heads", "head_dim", "embed"), pd
        )

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Attends causally over `x: [B, T, d]`.

        Args:
          x: `[B, T, d]` normalised input.
          positions: `[T]` or `[B, T]` RoPE positions; default `0..T-1`.
          segment_ids: `[B, T]` document ids of packed sequences (None: one document).

        Returns:
          `[B, T, d]` in the compute dtype.
        """
        c = self.config
        check_layer_input(x, c.d_model)
        if positions is None:
            positions = jnp.arange(x.shape[1])
        return causal_attention(
            x,
            self.W_q[...],
            self.W_k[...],
            self.W_v[...],
            self.W_o[...],
            positions,
            c.rope_theta,
            c.precision.compute_dtype,
            window=c.window,
            segment_ids=segment_ids,
            implementation=c.implementation,
        )
