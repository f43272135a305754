"""Causal multi-head self-attention with RoPE: the function and the NNX mixer around it.

    q = x W_q (+ b_q)                             [B, T, H, Dh]
    k, v = x W_k (+ b_k), x W_v (+ b_v)           [B, T, Hkv, Dh]   (grouped-query: H / Hkv
                                                                     query heads share each)
    q, k <- RMSNorm_head(q), RMSNorm_head(k)      optional (Qwen3's q/k norm)
    q, k <- RoPE(q, k, positions)                 optional Llama 3 frequency scaling
    o = softmax(q k^T / sqrt(Dh) + mask) v        causal, optional sliding window and segments
    y = o W_o (+ b_o)

Every addition to the plain layer (kv heads, biases, q/k norm, RoPE scaling) is off by default;
off, the layer has exactly the parameters (in the same order of random draws) and the outputs
it had without them. They are what the Llama / Mistral / Qwen2 / Qwen3 checkpoints need
(`ttt_jax.convert`).

The mask is causal; `window=w` keeps the last w keys of each query (itself included);
`segment_ids` (packed documents) keep only keys of the query's own segment, so a packed
sequence gives each document the outputs it would get alone when positions restart per
segment (the model passes such positions).

`implementation` picks the kernel behind `jax.nn.dot_product_attention`: "xla", "cudnn", or
"auto" (cuDNN flash attention on a GPU for bf16/fp16 inputs with head_dim a multiple of 8 up to
128 and no segment mask, XLA otherwise: cuDNN takes a dense mask only as a materialised bias,
which costs the `[B, T, T]` memory flash attention exists to avoid).

Decoding (`prefill(x, max_length)` or `init_cache(batch_size, max_length)`, then
`decode(x, cache)`): the cache holds the rotated keys and values of every token so far in
buffers of `max_length` rows, written in place, so every decode step has the same shapes (one
compilation for a whole generation).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ttt_jax.layers.common import (
    FP32,
    MixedPrecision,
    attention_projections,
    ones,
    param,
    zeros,
)
from ttt_jax.ops.core import (
    check_cache,
    check_choice,
    check_layer_input,
    check_optional_positive_int,
    check_positive_int,
    matmul,
    rms_norm,
)
from ttt_jax.ops.rope import llama3_inv_freq, rope

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
ROPE_SCALINGS = (None, "llama3")


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
      num_heads: H, query heads.
      head_dim: Dh (even, for RoPE); need not be `d_model / num_heads`.
      window: sliding-window size in tokens, None for full causal attention.
      rope_theta: RoPE base.
      implementation: "auto", "xla" or "cudnn".
      precision: the mixed-precision policy.
      num_kv_heads: Hkv, key / value heads (grouped-query attention; divides H). None: H.
      qk_norm: RMSNorm over each head of q and k before RoPE, scales `q_norm, k_norm: [Dh]`.
      qkv_bias: biases on the q, k and v projections.
      o_bias: a bias on the output projection.
      norm_eps: epsilon of the q/k RMSNorm.
      rope_scaling: None, or "llama3" (Llama 3.1's frequency scaling, `ops.rope.llama3_inv_freq`,
        with the four `rope_*` fields below).
      rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_positions:
        the llama3 scaling's parameters (`factor`, `low_freq_factor`, `high_freq_factor`,
        `original_max_position_embeddings` of a Hugging Face config).
    """

    d_model: int
    num_heads: int
    head_dim: int
    window: int | None = None
    rope_theta: float = 10000.0
    implementation: str = "auto"
    precision: MixedPrecision = FP32
    num_kv_heads: int | None = None
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    norm_eps: float = 1e-6
    rope_scaling: str | None = None
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192

    def __post_init__(self):
        check_positive_int("AttentionConfig.d_model", self.d_model)
        check_positive_int("AttentionConfig.num_heads", self.num_heads)
        check_positive_int("AttentionConfig.head_dim", self.head_dim)
        check_optional_positive_int("AttentionConfig.window", self.window)
        check_optional_positive_int("AttentionConfig.num_kv_heads", self.num_kv_heads)
        check_choice("AttentionConfig.implementation", self.implementation, IMPLEMENTATIONS)
        if self.head_dim % 2:
            raise ValueError(f"AttentionConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"AttentionConfig.num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads} (each key/value head serves a group of query heads)"
            )
        for field in ("qk_norm", "qkv_bias", "o_bias"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(
                    f"AttentionConfig.{field} must be a bool, got {getattr(self, field)!r}"
                )
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(
                f"AttentionConfig.rope_scaling={self.rope_scaling!r} is not one of {ROPE_SCALINGS}"
            )
        for field in ("norm_eps", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"AttentionConfig.{field} must be a number > 0, got {value!r}")
        check_positive_int(
            "AttentionConfig.rope_original_max_positions", self.rope_original_max_positions
        )
        if self.rope_scaling == "llama3" and not (
            self.rope_high_freq_factor > self.rope_low_freq_factor
        ):
            raise ValueError(
                f"AttentionConfig.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                f"rope_low_freq_factor={self.rope_low_freq_factor} (llama3 RoPE scaling)"
            )

    @property
    def kv_heads(self) -> int:
        """Hkv: `num_kv_heads`, or `num_heads` when it is None."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def inv_freq(self) -> np.ndarray | None:
        """The RoPE frequencies `[Dh / 2]` when scaled, None for the plain `theta^(-2i/Dh)`."""
        if self.rope_scaling is None:
            return None
        return llama3_inv_freq(
            self.head_dim,
            self.rope_theta,
            factor=self.rope_factor,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_positions=self.rope_original_max_positions,
        )


@struct.dataclass
class AttentionCache:
    """Decoding state of an attention mixer.

    Attributes:
      k, v: `[B, S, Hkv, Dh]` rotated keys and values of the tokens so far in rows
        `0 .. length - 1` (the rest unused), compute dtype; S is the cache's `max_length`.
      length: `[]` int32, tokens so far (the next token's position).
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array


class Attention(nnx.Module):
    """Causal RoPE self-attention mixer: `[B, T, d] -> [B, T, d]`.

    Parameters (logical axes): `W_q: [d, H, Dh]`, `W_k, W_v: [d, Hkv, Dh]` (embed, heads,
    head_dim) and `W_o: [H, Dh, d]` (heads, head_dim, embed), initialised `N(0, 1/fan_in)`;
    with `qkv_bias` `b_q: [H, Dh]`, `b_k, b_v: [Hkv, Dh]` (heads, head_dim), with `o_bias`
    `b_o: [d]` (embed), zeros; with `qk_norm` `q_norm, k_norm: [Dh]` (head_dim), ones.
    """

    def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        d, h, hkv, e = c.d_model, c.num_heads, c.kv_heads, c.head_dim
        pd = c.precision.param_dtype
        self.W_q, self.W_k, self.W_v, self.W_o = attention_projections(rngs, d, h, hkv, e, pd)
        # The optional parameters come after the plain ones: the plain layer's draws stay.
        if c.qkv_bias:
            self.b_q = param(rngs, zeros, (h, e), ("heads", "head_dim"), pd)
            self.b_k = param(rngs, zeros, (hkv, e), ("heads", "head_dim"), pd)
            self.b_v = param(rngs, zeros, (hkv, e), ("heads", "head_dim"), pd)
        if c.o_bias:
            self.b_o = param(rngs, zeros, (d,), ("embed",), pd)
        if c.qk_norm:
            self.q_norm = param(rngs, ones, (e,), ("head_dim",), pd)
            self.k_norm = param(rngs, ones, (e,), ("head_dim",), pd)

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
        if self._plain:
            # The layer as it was before the optional pieces, op for op.
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
        q, k, v = self._qkv(x, positions)
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        o = attend(q, k, v, window=c.window, mask=mask, implementation=c.implementation)
        return self._output(o)

    def init_cache(self, batch_size: int, max_length: int) -> AttentionCache:
        """An empty decoding cache for `batch_size` sequences of up to `max_length` tokens."""
        c = self.config
        b = check_positive_int("batch_size", batch_size)
        s = check_positive_int("max_length", max_length)
        cd = c.precision.compute_dtype
        shape = (b, s, c.kv_heads, c.head_dim)
        return AttentionCache(
            k=jnp.zeros(shape, cd), v=jnp.zeros(shape, cd), length=jnp.zeros((), jnp.int32)
        )

    def prefill(self, x: jax.Array, max_length: int) -> tuple[jax.Array, AttentionCache]:
        """A prompt `x: [B, T, d]` from an empty cache: `(layer(x), cache)`, the cache holding
        the prompt's keys and values in buffers of `max_length >= T` rows. The outputs take
        the whole-sequence path (flash attention where `implementation` allows it)."""
        c = self.config
        check_layer_input(x, c.d_model)
        t = x.shape[1]
        if check_positive_int("max_length", max_length) < t:
            raise ValueError(f"max_length={max_length} is shorter than the prompt ({t} tokens)")
        q, k, v = self._qkv(x, jnp.arange(t))
        o = attend(q, k, v, window=c.window, implementation=c.implementation)
        cache = self.init_cache(x.shape[0], max_length)
        cd = c.precision.compute_dtype
        cache = AttentionCache(
            k=jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cd), 0, axis=1),
            v=jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cd), 0, axis=1),
            length=jnp.asarray(t, jnp.int32),
        )
        return self._output(o), cache

    def decode(self, x: jax.Array, cache: AttentionCache) -> tuple[jax.Array, AttentionCache]:
        """Reads `x: [B, L, d]` (any L >= 1) after the tokens in `cache`.

        The new tokens take positions `length .. length + L - 1`; `length + L` must not exceed
        the cache's `max_length` (the buffers are written in place at traced offsets, which
        cannot be checked inside a jitted step: `ttt_jax.models.generate` checks it up front).

        Returns:
          `y: [B, L, d]` in the compute dtype (what `layer(x_all)[:, -L:]` gives for the whole
          sequence so far), and the cache after these tokens.
        """
        c = self.config
        check_layer_input(x, c.d_model)
        check_cache(cache, AttentionCache, lambda cache: cache.k.shape[0], x.shape[0])
        t, s = x.shape[1], cache.k.shape[1]
        if t > s:
            raise ValueError(f"decode: {t} tokens do not fit a cache of max_length {s}")
        positions = cache.length + jnp.arange(t)
        q, k, v = self._qkv(x, positions)
        cd = c.precision.compute_dtype
        keys = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cd), cache.length, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cd), cache.length, axis=1)
        key_pos = jnp.arange(s)[None, :]
        query_pos = positions[:, None]
        allowed = key_pos <= query_pos
        if c.window is not None:
            allowed = allowed & (query_pos - key_pos < c.window)
        o = jax.nn.dot_product_attention(
            q, keys, values, mask=allowed[None, None], implementation="xla"
        )
        new = AttentionCache(k=keys, v=values, length=(cache.length + t).astype(jnp.int32))
        return self._output(o), new

    # ----------------------------------------------------------------- pieces

    @property
    def _plain(self) -> bool:
        c = self.config
        return not (
            c.qk_norm
            or c.qkv_bias
            or c.o_bias
            or c.rope_scaling is not None
            or c.kv_heads != c.num_heads
        )

    def _qkv(self, x, positions):
        """q `[B, T, H, Dh]`, k and v `[B, T, Hkv, Dh]`: projected, normed, rotated."""
        c = self.config
        cd = c.precision.compute_dtype

        def proj(w, b):
            y = matmul("btd,dhe->bthe", x, w[...], cd)
            if b is not None:
                y = y + b[...].astype(y.dtype)
            return y.astype(cd)

        q = proj(self.W_q, self.b_q if c.qkv_bias else None)
        k = proj(self.W_k, self.b_k if c.qkv_bias else None)
        v = proj(self.W_v, self.b_v if c.qkv_bias else None)
        if c.qk_norm:
            q = rms_norm(q, self.q_norm[...], c.norm_eps).astype(cd)
            k = rms_norm(k, self.k_norm[...], c.norm_eps).astype(cd)
        inv_freq = c.inv_freq()
        q = rope(q, positions, c.rope_theta, inv_freq=inv_freq)
        k = rope(k, positions, c.rope_theta, inv_freq=inv_freq)
        return q, k, v

    def _output(self, o):
        c = self.config
        cd = c.precision.compute_dtype
        y = matmul("bthe,hed->btd", o, self.W_o[...], cd)
        if c.o_bias:
            y = y + self.b_o[...].astype(y.dtype)
        return y.astype(cd)
