"""LaCT block mixer (SPEC 3.2 "Layer"): sliding-window attention and a large-chunk SwiGLU fast
weight, both reading one qkv projection, summed before one output projection.

    q, k, v     = split(x W_qkv)                                    [B, T, d] each
    attn        = SWA(RoPE(q), RoPE(k), v)                          num_heads heads, window w
    q', k', v'  = silu(heads((q, k, v) * ttt_scale + ttt_offset))    [B, T, H, D]
    q', k'     <- RoPE(l2norm(q')), RoPE(l2norm(k'))
    lr_j        = softplus(x W_lr[:, j] + b_lr[j])                  [B, T, H], j = 0, 1, 2
    beta        = sigmoid(x W_m)                                    momentum (optional)
    ttt         = RMSNorm_head(lact_swiglu(q', k', v', lr, beta))   (* silu(x W_s), optional)
    y           = (attn + ttt) W_o

`b_lr` starts at `softplus^-1(base_lr)`, so every rate starts near `base_lr`. The fast weight's
start per head is `w0 = w0_left @ w0_right + 0.5 I` (and w2; rank r), `w1` dense; with
`rank=None` w0 and w2 are dense parameters. Gradients reach all of them through the op.

Precision (`MixedPrecision`): parameters in `param_dtype`; projections and the op's matmuls in
`compute_dtype` with fp32 accumulation; the TTT branch's elementwise work (scale, silu, L2 norm,
RoPE angles), the rates, momentum and every norm in fp32; fast weights in `state_dtype`.

Packed documents: `layer(x, segment_ids)` (`[B, T]` integers, a new document wherever the id
changes) gives each document the outputs it would get alone: the window attention masks keys of
other documents, RoPE positions count from 0 at each document's first token, and the fast
weight restarts at each document (the op's `segment_ids`).

Streaming: `layer.decode(x, cache) -> (y, cache')` continues a sequence (`layer(x)` is
`layer.decode(x)[0]`, a fresh one). The cache
(`LaCTCache`) holds the fast weights after the last complete chunk, the TTT inputs of the
unfinished chunk (re-read with the new tokens, since the op only learns from whole chunks),
the last `window - 1` attention keys and values, and the position. Feeding a sequence in pieces
of any size gives the outputs and cache of one call.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ttt_jax.layers.attention import IMPLEMENTATIONS, attend
from ttt_jax.layers.common import BF16, FP32, MixedPrecision, normal, ones, param, zeros
from ttt_jax.ops.core import (
    check_cache,
    check_choice,
    check_layer_input,
    check_optional_positive_int,
    check_policy_names,
    check_positive_int,
    check_scan_knobs,
    check_shapes,
    doc_spans,
    matmul,
    rms_norm,
    wide_dtype,
)
from ttt_jax.ops.lact import BACKWARDS, LaCTState, lact_low_rank_weight, lact_swiglu
from ttt_jax.ops.lact import NAMES as LACT_NAMES
from ttt_jax.ops.rope import rope

MUON_DTYPES = ("float32", "bfloat16")
BACKWARD_DTYPES = ("float32", "bfloat16")

L2_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class LaCTConfig:
    """Configuration of a LaCT layer (validated at construction).

    Attributes:
      d_model: d, model width.
      num_heads: heads of the sliding-window attention (`d / num_heads` even, for RoPE).
      num_fw_heads: H, fast-weight heads, each `D = d / H` wide (even, for RoPE).
      fw_hidden: Dh, hidden width of each head's SwiGLU fast weight (None: D).
      window: keys per query of the attention branch, the query itself included.
      chunk_size: C, tokens per fast-weight update.
      rank: r of the low-rank starts `w0, w2 = left @ right + 0.5 I` (`r <= min(Dh, D)`);
        None makes w0 and w2 dense parameters.
      base_lr: the rates' value at init (`softplus(b_lr) = base_lr`).
      use_momentum: momentum from `sigmoid(x W_m)` (per-chunk mean in the op).
      use_muon: orthogonalise every update (Newton-Schulz, 5 steps).
      muon_dtype: "float32" or "bfloat16", operand dtype of the update direction's matmuls
        (inner gradients and Newton-Schulz); None: the accumulation dtype (the op's
        `muon_dtype`: under bf16 compute, bf16 operands put the state 2-6e-2 off the fp32
        computation, past the bf16 tolerance; "bfloat16" is the fast opt-in).
      weight_norm: rescale the fast weights' rows to the start's row norms after each update.
      learnable_scale: multiply the normalised TTT output by `silu(x W_s)`, one scale per head.
      rope_theta: RoPE base of both branches.
      norm_eps: epsilon of the per-head RMSNorm of the TTT output.
      attention_impl: "auto" (cuDNN on a GPU where it applies, else XLA), "xla" or "cudnn".
      precision: the mixed-precision policy.
      checkpoint_group, remat_policy, backward: the op's memory knobs (`lact_swiglu`).
      backward_dtype: "float32", "bfloat16" or None, the op's `backward_dtype` (operand dtype
        of the backward's matmuls under bf16 compute; None and "float32": plain autodiff,
        fp32 products; "bfloat16": bf16 products, fp32 accumulation).
      debug: reject non-finite TTT inputs and rates (the op's `checkify` check).
    """

    d_model: int
    num_heads: int
    num_fw_heads: int
    fw_hidden: int | None = None
    window: int = 2048
    chunk_size: int = 2048
    rank: int | None = 32
    base_lr: float = 1e-3
    use_momentum: bool = True
    use_muon: bool = False
    muon_dtype: str | None = None
    weight_norm: bool = True
    learnable_scale: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attention_impl: str = "auto"
    precision: MixedPrecision = FP32
    checkpoint_group: int | None = None
    remat_policy: str | None = None
    backward: str = "custom"
    backward_dtype: str | None = None
    debug: bool = False

    def __post_init__(self):
        for f in ("d_model", "num_heads", "num_fw_heads", "window", "chunk_size"):
            check_positive_int(f"LaCTConfig.{f}", getattr(self, f))
        check_optional_positive_int("LaCTConfig.fw_hidden", self.fw_hidden)
        check_optional_positive_int("LaCTConfig.rank", self.rank)
        for f in ("num_heads", "num_fw_heads"):
            heads = getattr(self, f)
            if self.d_model % heads or (self.d_model // heads) % 2:
                raise ValueError(
                    f"LaCTConfig.{f}={heads} must divide d_model={self.d_model} into even head "
                    "widths (RoPE rotates pairs)"
                )
        if self.rank is not None and self.rank > min(self.fw_hidden_dim, self.fw_head_dim):
            raise ValueError(
                f"LaCTConfig.rank={self.rank} must be <= min(fw_hidden, d_model / num_fw_heads)"
                f" = min({self.fw_hidden_dim}, {self.fw_head_dim})"
            )
        for f in ("base_lr", "rope_theta", "norm_eps"):
            value = getattr(self, f)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise ValueError(f"LaCTConfig.{f} must be a finite number > 0, got {value!r}")
        for f in ("use_momentum", "use_muon", "weight_norm", "learnable_scale", "debug"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"LaCTConfig.{f} must be a bool, got {getattr(self, f)!r}")
        if self.muon_dtype is not None:
            check_choice("LaCTConfig.muon_dtype", self.muon_dtype, MUON_DTYPES)
        check_choice("LaCTConfig.attention_impl", self.attention_impl, IMPLEMENTATIONS)
        check_choice("LaCTConfig.backward", self.backward, BACKWARDS)
        if self.backward_dtype is not None:
            check_choice("LaCTConfig.backward_dtype", self.backward_dtype, BACKWARD_DTYPES)
        if not isinstance(self.precision, MixedPrecision):
            raise ValueError(
                f"LaCTConfig.precision must be a MixedPrecision, got {self.precision!r}"
            )
        check_scan_knobs(self.checkpoint_group, self.remat_policy)
        check_policy_names(self.remat_policy, LACT_NAMES, "the LaCT op", "LaCTConfig.remat_policy")

    @property
    def fw_head_dim(self) -> int:
        """D, the width of a fast-weight head."""
        return self.d_model // self.num_fw_heads

    @property
    def fw_hidden_dim(self) -> int:
        """Dh, the hidden width of a head's fast weight."""
        return self.fw_head_dim if self.fw_hidden is None else self.fw_hidden

    @classmethod
    def preset(cls, name: str, **overrides) -> LaCTConfig:
        """A named shape (`PRESETS`), with any field overridden."""
        check_choice("LaCTConfig preset", name, tuple(PRESETS))
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS = {
    # Unit-test size: two chunks and a window crossing in 16 tokens.
    "tiny": LaCTConfig(d_model=32, num_heads=4, num_fw_heads=2, window=8, chunk_size=8, rank=4),
    # The 760M LaCT layer shape of SPEC 3.2 / issue 3 (as the users trained it: momentum,
    # Muon, rank-32 starts), 24 attention heads of 64, 4 fast-weight heads of 384.
    "760m": LaCTConfig(
        d_model=1536,
        num_heads=24,
        num_fw_heads=4,
        window=2048,
        chunk_size=2048,
        rank=32,
        use_momentum=True,
        use_muon=True,
        learnable_scale=True,
        precision=BF16,
    ),
}


@struct.dataclass
class LaCTCache:
    """Streaming state of a LaCT layer (module docstring).

    Attributes:
      ttt: fast weights and momentum after the last complete chunk (`LaCTState`, state dtype).
      q, k, v: `[B, n, H, D]` TTT inputs of the unfinished chunk (`0 <= n < C`), compute dtype.
      lr: `[B, n, 3, H]` their rates (fp32); beta: `[B, n, H]` their momentum, None without.
      attn_k, attn_v: `[B, m, heads, head_dim]` the last `m = min(seen, window - 1)` attention
        keys (rotated) and values.
      position: `[]` int32, tokens seen so far (the next token's RoPE position).
    """

    ttt: LaCTState
    q: jax.Array
    k: jax.Array
    v: jax.Array
    lr: jax.Array
    beta: jax.Array | None
    attn_k: jax.Array
    attn_v: jax.Array
    position: jax.Array


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def _constant(value: float):
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


def _l2_normalise(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), L2_EPS)


class LaCTLayer(nnx.Module):
    """LaCT mixer `[B, T, d] -> [B, T, d]` (module docstring).

    Parameters (logical axes): `W_qkv [d, 3, d]` (embed, -, qkv: q | k | v), `W_o [d, d]`
    (qkv, embed), `ttt_scale, ttt_offset [3, d]`, `W_lr [d, 3, H]`, `b_lr [3, H]`,
    `W_m [d, H]` (momentum), `W_s [d, H]` (learnable scale), `w0_left, w2_left [H, Dh, r]`,
    `w0_right, w2_right [H, r, D]` (or dense `w0, w2 [H, Dh, D]`), `w1 [H, D, Dh]`,
    `ttt_norm [H, D]`.
    """

    def __init__(self, config: LaCTConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        d, h, fd, hid, r = c.d_model, c.num_fw_heads, c.fw_head_dim, c.fw_hidden_dim, c.rank
        pd = c.precision.param_dtype
        self.W_qkv = param(rngs, normal(d**-0.5), (d, 3, d), ("embed", None, "qkv"), pd)
        self.W_o = param(rngs, normal(d**-0.5), (d, d), ("qkv", "embed"), pd)
        self.ttt_scale = param(rngs, ones, (3, d), (None, "qkv"), pd)
        self.ttt_offset = param(rngs, zeros, (3, d), (None, "qkv"), pd)
        self.W_lr = param(rngs, normal(0.02), (d, 3, h), ("embed", None, "heads"), pd)
        b_lr = _constant(_inverse_softplus(c.base_lr))
        self.b_lr = param(rngs, b_lr, (3, h), (None, "heads"), pd)
        if c.use_momentum:
            self.W_m = param(rngs, normal(0.02), (d, h), ("embed", "heads"), pd)
        if c.learnable_scale:
            self.W_s = param(rngs, normal(0.02), (d, h), ("embed", "heads"), pd)
        std = normal(fd**-0.5)
        for j in (0, 2):
            if r is None:
                setattr(self, f"w{j}", param(rngs, std, (h, hid, fd), ("heads", None, None), pd))
            else:
                left = param(rngs, std, (h, hid, r), ("heads", None, "rank"), pd)
                setattr(self, f"w{j}_left", left)
                right = param(rngs, std, (h, r, fd), ("heads", "rank", None), pd)
                setattr(self, f"w{j}_right", right)
        self.w1 = param(rngs, normal(hid**-0.5), (h, fd, hid), ("heads", None, None), pd)
        self.ttt_norm = param(rngs, ones, (h, fd), ("heads", "head_dim"), pd)

    def slow_weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The fast weight's start `(w0, w1, w2)`: `[H, Dh, D]`, `[H, D, Dh]`, `[H, Dh, D]`."""
        if self.config.rank is None:
            return self.w0[...], self.w1[...], self.w2[...]
        w0 = lact_low_rank_weight(self.w0_left[...], self.w0_right[...])
        w2 = lact_low_rank_weight(self.w2_left[...], self.w2_right[...])
        return w0, self.w1[...], w2

    def init_cache(self, batch_size: int) -> LaCTCache:
        """The cache before any token: fast weights at their start, nothing pending."""
        sd = self.config.precision.state_dtype
        b = check_positive_int("batch_size", batch_size)
        ws = [jnp.broadcast_to(w, (b, *w.shape)).astype(sd) for w in self.slow_weights()]
        return self._empty_cache(b, LaCTState(*ws, *(jnp.zeros_like(w) for w in ws)))

    def _empty_cache(self, b: int, ttt: LaCTState | None) -> LaCTCache:
        c = self.config
        h, fd, cd = c.num_fw_heads, c.fw_head_dim, c.precision.compute_dtype
        hd = c.d_model // c.num_heads
        return LaCTCache(
            ttt=ttt,
            q=jnp.zeros((b, 0, h, fd), cd),
            k=jnp.zeros((b, 0, h, fd), cd),
            v=jnp.zeros((b, 0, h, fd), cd),
            lr=jnp.zeros((b, 0, 3, h), wide_dtype(cd)),
            beta=jnp.zeros((b, 0, h), wide_dtype(cd)) if c.use_momentum else None,
            attn_k=jnp.zeros((b, 0, c.num_heads, hd), cd),
            attn_v=jnp.zeros((b, 0, c.num_heads, hd), cd),
            position=jnp.zeros((), jnp.int32),
        )

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Whole-sequence forward: `x: [B, T, d]` -> `y: [B, T, d]` in the compute dtype.

        The sequence starts at position 0 and the fast weight at `slow_weights()` (gradients
        reach the start through the whole scan). `segment_ids: [B, T]` integers pack
        documents in each row (module docstring); None: one document.
        """
        if segment_ids is None:
            y, _ = self.decode(x)
            return y
        check_layer_input(x, self.config.d_model)
        check_shapes([("x", x, ("B", "T", "d")), ("segment_ids", segment_ids, ("B", "T"))])
        if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise ValueError(
                f"segment_ids must have an integer dtype, got {jnp.result_type(segment_ids)}"
            )
        y, _ = self._read(x, self._empty_cache(x.shape[0], None), segment_ids)
        return y

    def decode(
        self, x: jax.Array, cache: LaCTCache | None = None, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, LaCTCache]:
        """Reads `x: [B, T, d]` (any T >= 1) continuing from `cache` (None: a fresh sequence,
        exactly as `__call__`).

        A decode streams one document: `segment_ids` is rejected (a ValueError); start the
        next document from `init_cache`, or call the layer on the packed row.

        Returns:
          `y: [B, T, d]` in the compute dtype, and the `LaCTCache` after these tokens.
        """
        if segment_ids is not None:
            raise ValueError(
                "LaCTLayer.decode streams one document and does not take segment_ids: start "
                "each document from init_cache(batch_size), or call the layer on the packed "
                "row (layer(x, segment_ids=...))"
            )
        check_layer_input(x, self.config.d_model)
        if cache is None:
            cache = self._empty_cache(x.shape[0], None)
        check_cache(cache, LaCTCache, lambda cache: cache.q.shape[0], x.shape[0])
        return self._read(x, cache, None)

    def _read(self, x: jax.Array, cache: LaCTCache, segment_ids: jax.Array | None):
        """`decode` after its checks; with `segment_ids` (a fresh cache only) positions count
        per document and attention and the op restart at each one."""
        c = self.config
        cd = c.precision.compute_dtype
        b, t, d = x.shape
        x = x.astype(cd)
        if segment_ids is None:
            positions, mask = cache.position + jnp.arange(t), None
        else:
            positions = doc_spans(segment_ids).within
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        qkv = matmul("btd,dje->btje", x, self.W_qkv[...], cd).astype(cd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn, attn_k, attn_v = self._attention(q, k, v, positions, cache, mask)

        fq, fk, fv = self._ttt_inputs(q, k, v, positions)
        lr = jax.nn.softplus(self._project(x, self.W_lr[...]) + self.b_lr[...])  # [B, T, 3, H]
        beta = jax.nn.sigmoid(self._project(x, self.W_m[...])) if c.use_momentum else None
        n = cache.q.shape[1]
        cat = lambda old, new: jnp.concatenate([old, new], axis=1)  # noqa: E731
        fq, fk, fv, lr = cat(cache.q, fq), cat(cache.k, fk), cat(cache.v, fv), cat(cache.lr, lr)
        beta = None if beta is None else cat(cache.beta, beta)
        w0, w1, w2 = self.slow_weights()
        o, ttt = lact_swiglu(
            fq,
            fk,
            fv,
            lr[:, :, 0],
            lr[:, :, 1],
            lr[:, :, 2],
            w0=w0,
            w1=w1,
            w2=w2,
            chunk_size=c.chunk_size,
            momentum=beta,
            use_muon=c.use_muon,
            muon_dtype=c.muon_dtype,
            weight_norm=c.weight_norm,
            segment_ids=segment_ids,
            initial_state=cache.ttt,
            checkpoint_group=c.checkpoint_group,
            remat_policy=c.remat_policy,
            state_dtype=c.precision.state_dtype,
            backward=c.backward,
            backward_dtype=c.backward_dtype,
            debug=c.debug,
        )
        o = rms_norm(o[:, n:], self.ttt_norm[...], c.norm_eps)
        if c.learnable_scale:
            o = o * jax.nn.silu(self._project(x, self.W_s[...]))[..., None]
        y = matmul("btd,de->bte", attn.astype(o.dtype) + o.reshape(b, t, d), self.W_o[...], cd)
        y = y.astype(cd)

        pending = (n + t) % c.chunk_size
        keep = lambda a: a[:, a.shape[1] - pending :]  # noqa: E731
        new_cache = LaCTCache(
            ttt=ttt,
            q=keep(fq),
            k=keep(fk),
            v=keep(fv),
            lr=keep(lr),
            beta=None if beta is None else keep(beta),
            attn_k=attn_k,
            attn_v=attn_v,
            position=(cache.position + t).astype(jnp.int32),
        )
        return y, new_cache

    def _project(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """`x @ w` over d for the rate, momentum and scale heads, returned in fp32."""
        return matmul("btd,d...->bt...", x, w, self.config.precision.compute_dtype)

    def _attention(self, q, k, v, positions, cache: LaCTCache, mask=None):
        """The windowed attention branch and the keys / values it keeps for the next call
        (`mask: [B, 1, T, T]`, segments, only without cached keys)."""
        c = self.config
        b, t, d = q.shape
        heads = (b, t, c.num_heads, d // c.num_heads)
        q = rope(q.reshape(heads), positions, c.rope_theta)
        k = jnp.concatenate([cache.attn_k, rope(k.reshape(heads), positions, c.rope_theta)], 1)
        v = jnp.concatenate([cache.attn_v, v.reshape(heads)], 1)
        o = attend(q, k, v, window=c.window, mask=mask, implementation=c.attention_impl)
        keep = min(c.window - 1, k.shape[1])
        return o.reshape(b, t, d), k[:, k.shape[1] - keep :], v[:, v.shape[1] - keep :]

    def _ttt_inputs(self, q, k, v, positions):
        """Fast-weight heads of q, k, v: scale/offset, silu, L2 norm and RoPE of q and k."""
        c = self.config
        b, t, _ = q.shape
        wide = wide_dtype(q.dtype)
        scale, offset = self.ttt_scale[...].astype(wide), self.ttt_offset[...].astype(wide)
        heads = (b, t, c.num_fw_heads, c.fw_head_dim)
        fq, fk, fv = (
            jax.nn.silu((a.astype(wide) * scale[j] + offset[j]).reshape(heads))
            for j, a in enumerate((q, k, v))
        )
        fq = rope(_l2_normalise(fq), positions, c.rope_theta)
        fk = rope(_l2_normalise(fk), positions, c.rope_theta)
        cd = c.precision.compute_dtype
        return fq.astype(cd), fk.astype(cd), fv.astype(cd)
