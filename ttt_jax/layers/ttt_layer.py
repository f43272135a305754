"""TTT-Linear and TTT-MLP sequence-mixing layers (SPEC 3.1, "Layer around it").

Per token `x_t: [d_model]` (Mamba backbone, the default):

    xqk = x W_qk;  q = conv_q(xqk);  k = conv_k(xqk)      (causal depthwise, width 4)
    v = x W_v;  q, k <- RoPE(q, k, position mod C)
    eta = base_lr * sigmoid(x lr_w_h + lr_b_h) / D         per head
    token_scale_i = max(1/(i+1) + token_offset_i, 0)
    o = ttt_op(q, k, v, eta)                               per head: q + LN(f_{W_i}(q))
    y = (gelu(x W_g) * PostLN(o)) W_o

The Transformer backbone takes separate `W_q`, `W_k`, no conv and no gate.

Streaming (`init_cache` / `decode`): the cache carries the fast weights at the last mini-batch
boundary, the conv's input history, and the projected q/k/v/eta of the unfinished mini-batch.
Each call re-reads the unfinished mini-batch together with the new tokens (every token of a
mini-batch needs all earlier tokens' gradients at the mini-batch's start weights), so feeding
a sequence in pieces of any size, token by token included, gives the outputs of one call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ttt_jax.layers.common import FP32, MixedPrecision, normal, ones, param, zeros
from ttt_jax.ops.causal_conv import causal_conv
from ttt_jax.ops.core import (
    check_cache,
    check_choice,
    check_finite_number,
    check_layer_input,
    check_policy_names,
    check_positive_int,
    check_scan_knobs,
    check_shapes,
    doc_spans,
    gelu_tanh,
    layer_norm,
    matmul,
    wide_dtype,
)
from ttt_jax.ops.rope import rope
from ttt_jax.ops.ttt import IMPLS as TTT_IMPLS
from ttt_jax.ops.ttt import NAMES as TTT_NAMES
from ttt_jax.ops.ttt import (
    TTTLinearState,
    TTTMLPState,
    resolve_impl,
    resolve_mlp_impl,
    ttt_linear,
    ttt_mlp,
)

# The post LayerNorm's epsilon, and the dtype it computes in whatever the compute dtype (SPEC 4).
POST_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """Configuration of a TTT layer.

    Attributes:
      d_model: model width; must equal `num_heads * head_dim`.
      num_heads: H, TTT heads.
      inner: "linear" (TTT-Linear) or "mlp" (TTT-MLP, hidden `mlp_ratio * head_dim`).
      mini_batch_size: C, tokens per inner gradient step.
      base_lr: inner learning-rate scale; None picks 1.0 (linear) or 0.1 (mlp), as in the paper.
      backbone: "mamba" (shared q/k projection, causal convs, output gate) or "transformer".
      rope_theta: RoPE base; positions are taken modulo C.
      conv_width: taps of the causal q/k convs (mamba backbone).
      mlp_ratio: hidden width factor of TTT-MLP's inner model.
      checkpoint_group: inner-scan remat group size (None: no remat). Default 4 with
        unroll 4: on an H100 (B=8, T=32768, TTT-Linear op) the fastest setting measured,
        150 ms fwd+bwd at 5.3 GB vs 208 ms at 13.5 GB without remat (benchmarks/RESULTS.md).
      remat_policy: policy name inside a remat group (`ttt_jax.ops.core.remat`).
      precision: the mixed-precision policy.
      unroll: inner scan unroll (speed only).
      impl: the TTT op's implementation (`ttt_jax.ops.ttt.ttt_linear` / `ttt_mlp`): "auto"
        (TTT-Linear: the fused Pallas kernel on a GPU for the calls it supports, the XLA scan
        elsewhere and with `segment_ids`, whose kernel path has not run on a GPU yet ("pallas"
        takes it); TTT-MLP: the XLA scan, until its kernel is timed on a GPU), "xla", "pallas"
        or "pallas_interpret".
      kernel_checkpoint_group: the kernel's state-checkpoint spacing in mini-batches (what
        `checkpoint_group` is to the XLA scan): its backward keeps the fp32 state every this
        many mini-batches, `B H ceil(T / (C G)) (D^2 + D) 4` bytes (TTT-MLP, hidden F:
        `(2 D F + F + D) 4` per checkpoint and head).
    """

    d_model: int
    num_heads: int
    inner: str = "linear"
    mini_batch_size: int = 16
    base_lr: float | None = None
    backbone: str = "mamba"
    rope_theta: float = 10000.0
    conv_width: int = 4
    mlp_ratio: int = 4
    checkpoint_group: int | None = 4
    remat_policy: str | None = None
    precision: MixedPrecision = FP32
    unroll: int = 4
    impl: str = "auto"
    kernel_checkpoint_group: int = 16

    def __post_init__(self):
        check_positive_int("TTTConfig.d_model", self.d_model)
        check_positive_int("TTTConfig.num_heads", self.num_heads)
        check_positive_int("TTTConfig.mini_batch_size", self.mini_batch_size)
        check_positive_int("TTTConfig.conv_width", self.conv_width)
        check_positive_int("TTTConfig.mlp_ratio", self.mlp_ratio)
        check_positive_int("TTTConfig.unroll", self.unroll)
        check_positive_int("TTTConfig.kernel_checkpoint_group", self.kernel_checkpoint_group)
        check_choice("TTTConfig.impl", self.impl, TTT_IMPLS)
        check_choice("TTTConfig.inner", self.inner, ("linear", "mlp"))
        check_choice("TTTConfig.backbone", self.backbone, ("mamba", "transformer"))
        check_scan_knobs(self.checkpoint_group, self.remat_policy)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"TTTConfig.d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"TTTConfig head_dim={self.head_dim} must be even for RoPE")
        if self.base_lr is not None:
            check_finite_number("TTTConfig.base_lr", self.base_lr)
            if not self.base_lr > 0:
                raise ValueError(f"TTTConfig.base_lr={self.base_lr} must be > 0")
        check_finite_number("TTTConfig.rope_theta", self.rope_theta, positive=True)
        check_policy_names(self.remat_policy, TTT_NAMES, "the TTT op", "TTTConfig.remat_policy")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def lr_scale(self) -> float:
        return (
            self.base_lr if self.base_lr is not None else (1.0 if self.inner == "linear" else 0.1)
        )


@struct.dataclass
class TTTCache:
    """Streaming state of a TTT layer for one batch.

    Attributes:
      state: fast weights at the last mini-batch boundary (`TTTLinearState` / `TTTMLPState`).
      conv_history: `[B, conv_width - 1, d_model]` last inputs of the q/k convs (mamba), or
        `[B, 0, d_model]`.
      q, k, v: `[B, n, H, D]` projected (conv'd, rotated) tokens of the unfinished mini-batch,
        `0 <= n < C`.
      eta: `[B, n, H]` their inner learning rates.
    """

    state: TTTLinearState | TTTMLPState
    conv_history: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    eta: jax.Array


class TTTLayer(nnx.Module):
    """A TTT sequence mixer: `[B, T, d_model] -> [B, T, d_model]` (see module docstring)."""

    def __init__(self, config: TTTConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, h, d, w = config, config.num_heads, config.head_dim, config.d_model
        pd = config.precision.param_dtype
        std = normal(0.02)
        if c.backbone == "mamba":
            self.W_qk = param(rngs, std, (w, h * d), ("embed", "qkv"), pd)
            conv_init = normal(1.0 / c.conv_width**0.5)
            self.conv_q_w = param(rngs, conv_init, (c.conv_width, h * d), ("conv", "qkv"), pd)
            self.conv_q_b = param(rngs, zeros, (h * d,), ("qkv",), pd)
            self.conv_k_w = param(rngs, conv_init, (c.conv_width, h * d), ("conv", "qkv"), pd)
            self.conv_k_b = param(rngs, zeros, (h * d,), ("qkv",), pd)
            self.W_g = param(rngs, std, (w, h * d), ("embed", "qkv"), pd)
        else:
            self.W_q = param(rngs, std, (w, h * d), ("embed", "qkv"), pd)
            self.W_k = param(rngs, std, (w, h * d), ("embed", "qkv"), pd)
        self.W_v = param(rngs, std, (w, h * d), ("embed", "qkv"), pd)
        self.W_o = param(rngs, std, (h * d, w), ("qkv", "embed"), pd)
        self.lr_w = param(rngs, std, (h, w), ("heads", "embed"), pd)
        self.lr_b = param(rngs, zeros, (h,), ("heads",), pd)
        self.token_offset = param(rngs, zeros, (c.mini_batch_size,), ("chunk",), pd)
        self.ttt_norm_scale = param(rngs, ones, (h, d), ("heads", "head_dim"), pd)
        self.ttt_norm_bias = param(rngs, zeros, (h, d), ("heads", "head_dim"), pd)
        self.post_norm_scale = param(rngs, ones, (h * d,), ("qkv",), pd)
        self.post_norm_bias = param(rngs, zeros, (h * d,), ("qkv",), pd)
        if c.inner == "linear":
            self.W1 = param(rngs, std, (h, d, d), ("heads", None, None), pd)
            self.b1 = param(rngs, zeros, (h, d), ("heads", None), pd)
        else:
            f = c.mlp_ratio * d
            self.W1 = param(rngs, std, (h, d, f), ("heads", None, None), pd)
            self.b1 = param(rngs, zeros, (h, f), ("heads", None), pd)
            self.W2 = param(rngs, std, (h, f, d), ("heads", None, None), pd)
            self.b2 = param(rngs, zeros, (h, d), ("heads", None), pd)

    # ----------------------------------------------------------------- public API

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Whole-sequence forward. `x: [B, T, d_model]` -> `[B, T, d_model]` (compute dtype).

        `segment_ids: [B, T]` integers (a new document wherever the id changes) packs documents
        in a row: the q/k convs, the RoPE positions (mod C from each document's start) and the
        fast weights restart at every document, so each gets the outputs it would get alone.
        """
        check_layer_input(x, self.config.d_model)
        if segment_ids is None:
            y, _ = self.decode(x)
            return y
        c = self.config
        check_shapes([("x", x, ("B", "T", c.d_model)), ("segment_ids", segment_ids, ("B", "T"))])
        if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise ValueError(
                f"segment_ids must have an integer dtype, got {jnp.result_type(segment_ids)}"
            )
        x = x.astype(c.precision.compute_dtype)
        cache = self.init_cache(x.shape[0])
        q, k, v, _ = self._qkv(x, cache.conv_history, segment_ids)
        positions = doc_spans(segment_ids).within % c.mini_batch_size
        q = rope(q, positions, c.rope_theta)
        k = rope(k, positions, c.rope_theta)
        o, _ = self._ttt(q, k, v, self._eta(x), cache.state, segment_ids)
        return self._output(x, o)

    def init_cache(self, batch_size: int) -> TTTCache:
        """An empty streaming cache: fast weights at their initial values, nothing pending."""
        c, b = self.config, batch_size
        h, d = c.num_heads, c.head_dim
        sd, cd = c.precision.state_dtype, c.precision.compute_dtype
        state = jax.tree.map(
            lambda p: jnp.broadcast_to(p, (b, *p.shape)).astype(sd), self._inner_params()
        )
        state = (TTTLinearState if c.inner == "linear" else TTTMLPState)(**state)
        hist = c.conv_width - 1 if c.backbone == "mamba" else 0
        return TTTCache(
            state=state,
            conv_history=jnp.zeros((b, hist, c.d_model), cd),
            q=jnp.zeros((b, 0, h, d), cd),
            k=jnp.zeros((b, 0, h, d), cd),
            v=jnp.zeros((b, 0, h, d), cd),
            eta=jnp.zeros((b, 0, h), jnp.float32),
        )

    def decode(
        self, x: jax.Array, cache: TTTCache | None = None, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, TTTCache]:
        """Reads `x: [B, L, d_model]` (any L >= 1) continuing from `cache` (None: a fresh
        sequence, `init_cache`).

        A decode streams one document: `segment_ids` is rejected (a ValueError); start the
        next document from `init_cache`, or call the layer on the packed row.

        Returns:
          `y: [B, L, d_model]` and the cache after these tokens.
        """
        if segment_ids is not None:
            raise ValueError(
                "TTTLayer.decode streams one document and does not take segment_ids: start each "
                "document from init_cache(batch_size), or call the layer on the packed row "
                "(layer(x, segment_ids=...))"
            )
        c = self.config
        cd = c.precision.compute_dtype
        check_layer_input(x, c.d_model)
        if cache is None:
            cache = self.init_cache(x.shape[0])
        check_cache(cache, TTTCache, lambda cache: cache.q.shape[0], x.shape[0])
        x = x.astype(cd)
        n_pending, length = cache.q.shape[1], x.shape[1]
        q, k, v, history = self._qkv(x, cache.conv_history)
        # RoPE positions restart every mini-batch; pending tokens started at a boundary.
        positions = (n_pending + jnp.arange(length)) % c.mini_batch_size
        q = rope(q, positions, c.rope_theta)
        k = rope(k, positions, c.rope_theta)
        eta = self._eta(x)

        q_all, k_all, v_all, eta_all = (
            jnp.concatenate([p, n], axis=1)
            for p, n in ((cache.q, q), (cache.k, k), (cache.v, v), (cache.eta, eta))
        )
        o, state = self._ttt(q_all, k_all, v_all, eta_all, cache.state)
        o = o[:, n_pending:]
        keep = (n_pending + length) % c.mini_batch_size
        total = n_pending + length
        new_cache = TTTCache(
            state=state,
            conv_history=history,
            q=q_all[:, total - keep :],
            k=k_all[:, total - keep :],
            v=v_all[:, total - keep :],
            eta=eta_all[:, total - keep :],
        )
        return self._output(x, o), new_cache

    # ----------------------------------------------------------------- pieces

    def _inner_params(self) -> dict[str, jax.Array]:
        names = ("W1", "b1") if self.config.inner == "linear" else ("W1", "b1", "W2", "b2")
        return {n: getattr(self, n)[...] for n in names}

    def _qkv(self, x, history, segment_ids=None):
        c = self.config
        cd = c.precision.compute_dtype
        b, t, _ = x.shape
        if c.backbone == "mamba":
            xqk = matmul("btd,de->bte", x, self.W_qk[...], cd).astype(cd)
            q = causal_conv(xqk, self.conv_q_w[...], self.conv_q_b[...], history, segment_ids)
            k = causal_conv(xqk, self.conv_k_w[...], self.conv_k_b[...], history, segment_ids)
            seen = jnp.concatenate([history, xqk], axis=1)
            history = seen[:, seen.shape[1] - history.shape[1] :]
        else:
            q = matmul("btd,de->bte", x, self.W_q[...], cd).astype(cd)
            k = matmul("btd,de->bte", x, self.W_k[...], cd).astype(cd)
        v = matmul("btd,de->bte", x, self.W_v[...], cd).astype(cd)
        shape = (b, t, c.num_heads, c.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape), history

    def _eta(self, x):
        c = self.config
        logits = matmul("btw,hw->bth", x, self.lr_w[...], x.dtype)
        return c.lr_scale * jax.nn.sigmoid(logits + self.lr_b[...]) / c.head_dim

    def _token_scale(self):
        c = self.config
        offset = self.token_offset[...]
        w = wide_dtype(offset.dtype)
        base = 1.0 / jnp.arange(1, c.mini_batch_size + 1, dtype=w)
        return jnp.maximum(base + offset.astype(w), 0.0)

    def _ttt(self, q, k, v, eta, state, segment_ids=None):
        c = self.config
        knobs = dict(checkpoint_group=c.checkpoint_group, remat_policy=c.remat_policy)
        if c.inner == "linear":
            op = ttt_linear
            backend = resolve_impl(
                c.impl, q, c.mini_batch_size, c.precision.state_dtype, segment_ids
            )
        else:
            op = ttt_mlp
            # "auto" keeps TTT-MLP on the XLA scan: its kernel passes the interpreter tests but
            # has not been timed on a GPU yet (issue 17); "pallas" opts in.
            backend = resolve_mlp_impl(
                "xla" if c.impl == "auto" else c.impl,
                q,
                c.mlp_ratio * c.head_dim,
                c.mini_batch_size,
                c.precision.state_dtype,
                segment_ids,
            )
        if backend != "xla":  # the kernel's own checkpoint spacing; no remat policy
            knobs = dict(impl=backend, checkpoint_group=c.kernel_checkpoint_group)
        return op(
            q,
            k,
            v,
            eta,
            **self._inner_params(),
            ln_scale=self.ttt_norm_scale[...],
            ln_bias=self.ttt_norm_bias[...],
            mini_batch_size=c.mini_batch_size,
            token_scale=self._token_scale(),
            initial_state=state,
            segment_ids=segment_ids,
            state_dtype=c.precision.state_dtype,
            unroll=c.unroll,
            **knobs,
        )

    def _output(self, x, o):
        c = self.config
        cd = c.precision.compute_dtype
        b, t = o.shape[:2]
        o = layer_norm(
            o.reshape(b, t, -1),
            self.post_norm_scale[...],
            self.post_norm_bias[...],
            eps=POST_NORM_EPS,
            dtype=wide_dtype(cd),
        )
        if c.backbone == "mamba":
            gate = matmul("btd,de->bte", x, self.W_g[...], cd).astype(cd)
            o = gelu_tanh(gate.astype(o.dtype)) * o
        return matmul("bte,ed->btd", o, self.W_o[...], cd).astype(cd)


class TTTLinear(TTTLayer):
    """TTT-Linear layer; `config.inner` must be "linear"."""

    def __init__(self, config: TTTConfig, *, rngs: nnx.Rngs):
        if config.inner != "linear":
            raise ValueError(f"TTTLinear needs TTTConfig.inner='linear', got {config.inner!r}")
        super().__init__(config, rngs=rngs)


class TTTMLP(TTTLayer):
    """TTT-MLP layer; `config.inner` must be "mlp"."""

    def __init__(self, config: TTTConfig, *, rngs: nnx.Rngs):
        if config.inner != "mlp":
            raise ValueError(f"TTTMLP needs TTTConfig.inner='mlp', got {config.inner!r}")
        super().__init__(config, rngs=rngs)
