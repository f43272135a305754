"""In-Place TTT MLP (SPEC 3.3): a gated MLP whose down projection learns as the sequence goes.

    Z = act(x W_gate) * (x W_up)                  [B, T, F], SwiGLU by default
    V = conv(X0) @ W_target                       targets, conv within each chunk
    O_i = Z_i (W_down + eta * sum_{j<i} V_j^T Z_j)^T

`X0` is the token embeddings (passed in by the model, `target_source="embeddings"`) or the MLP
input itself (`"input"`). The math and memory behaviour are `ttt_jax.ops.inplace.op`'s.

Parameters (logical axes): `w_gate, w_up, w_down: [d, F]` (embed, mlp), `W_down` applied as
`Z W_down^T` as in SPEC 3.3; `ttt_conv: [K, d]` (conv, embed), K = 5 (`centered`) or 2
(`causal_next`); `ttt_proj: [d, d]` (embed, None), `W_target`, its output axis replicated.

Init: the dense weights `N(0, 1/fan_in)`; the official In-Place TTT init for the rest, zero
conv and a diagonal `W_target` with `N(0, 0.02^2)` entries, so `V = 0` and the layer starts
exactly at the plain gated MLP while `ttt_conv` still gets gradient (through `W_target`).

Streaming inference (`prefill`, `decode`): the cache holds the current fast weight and the raw
`Z` and `X0` of the unfinished chunk; when the chunk completes its conv is computed over the
whole chunk (it looks ahead within the chunk) and the weight is updated, exactly as one call
over the whole sequence would.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax import lax

from ttt_jax.layers.common import FP32, MixedPrecision, normal, param, zeros
from ttt_jax.ops.core import (
    check_cache,
    check_finite_number,
    check_layer_input,
    check_policy_names,
    check_scan_knobs,
    check_shapes,
    gelu_tanh,
    matmul,
)
from ttt_jax.ops.inplace import BACKWARDS, CONV_KERNEL_SIZES, PREFIXES, InPlaceState, inplace_ttt
from ttt_jax.ops.inplace import NAMES as INPLACE_NAMES

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": gelu_tanh}
TARGET_SOURCES = ("embeddings", "input")


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


@dataclasses.dataclass(frozen=True)
class InPlaceMLPConfig:
    """Shape and In-Place TTT settings of the MLP.

    Attributes:
      d_model: d, width of the MLP input and output.
      d_ff: F, hidden width.
      chunk_size: C, tokens per fast-weight update (512 to 4096 in the paper).
      conv_mode: `centered` (kernel 5, the official one) or `causal_next` (kernel 2).
      target_source: `embeddings` (X0 = token embeddings, passed to the call) or `input`.
      activation: gate activation, `silu` (SwiGLU) or `gelu_tanh` (GeGLU).
      eta: the fast-weight learning rate (a constant; its scale trades off with `ttt_proj`).
      clip_tau: Frobenius clip of each chunk's update (None: off, the training default).
      ttt: False gives the plain gated MLP with the same parameters (the baseline).
      prefix, backward, checkpoint_group, remat_policy: passed to `inplace_ttt`.
      precision: the mixed-precision policy.
    """

    d_model: int
    d_ff: int
    chunk_size: int = 1024
    conv_mode: str = "centered"
    target_source: str = "embeddings"
    activation: str = "silu"
    eta: float = 1.0
    clip_tau: float | None = None
    ttt: bool = True
    prefix: str = "sequential"
    backward: str = "custom"
    checkpoint_group: int | None = None
    remat_policy: str | None = None
    precision: MixedPrecision = FP32

    def __post_init__(self):
        for field in ("d_model", "d_ff", "chunk_size"):
            if not _positive_int(getattr(self, field)):
                raise ValueError(
                    f"InPlaceMLPConfig.{field} must be a positive int, got {getattr(self, field)!r}"
                )
        choices = {
            "conv_mode": tuple(CONV_KERNEL_SIZES),
            "target_source": TARGET_SOURCES,
            "activation": tuple(ACTIVATIONS),
            "prefix": PREFIXES,
            "backward": BACKWARDS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"InPlaceMLPConfig.{field}={getattr(self, field)!r} is not one of {allowed}"
                )
        check_finite_number("InPlaceMLPConfig.eta", self.eta)
        if self.clip_tau is not None:
            check_finite_number("InPlaceMLPConfig.clip_tau", self.clip_tau, positive=True)
        if not isinstance(self.ttt, bool):
            raise ValueError(f"InPlaceMLPConfig.ttt must be a bool, got {self.ttt!r}")
        if not isinstance(self.precision, MixedPrecision):
            raise ValueError(
                f"InPlaceMLPConfig.precision must be a MixedPrecision, got {self.precision!r}"
            )
        try:
            check_scan_knobs(self.checkpoint_group, self.remat_policy)
            check_policy_names(self.remat_policy, INPLACE_NAMES, "the In-Place TTT op")
        except ValueError as err:
            raise ValueError(f"InPlaceMLPConfig: {err}") from None

    @property
    def conv_size(self) -> int:
        return CONV_KERNEL_SIZES[self.conv_mode]


@struct.dataclass
class InPlaceCache:
    """Streaming state: `w: [B, d, F]` (state dtype), the unfinished chunk's raw `z: [B, C, F]`
    and targets `x0: [B, C, d]` (compute dtype), and how many of its C rows are filled
    (`count`, an int32 scalar: the batch decodes in lockstep)."""

    w: jax.Array
    z: jax.Array
    x0: jax.Array
    count: jax.Array


class InPlaceMLP(nnx.Module):
    """Gated MLP with In-Place TTT on its down projection (module docstring)."""

    def __init__(self, config: InPlaceMLPConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, pd = config, config.precision.param_dtype
        d, f = c.d_model, c.d_ff
        self.w_gate = param(rngs, normal(d**-0.5), (d, f), ("embed", "mlp"), pd)
        self.w_up = param(rngs, normal(d**-0.5), (d, f), ("embed", "mlp"), pd)
        self.w_down = param(rngs, normal(f**-0.5), (d, f), ("embed", "mlp"), pd)
        self.ttt_conv = param(rngs, zeros, (c.conv_size, d), ("conv", "embed"), pd)
        self.ttt_proj = param(rngs, _diagonal(0.02), (d, d), ("embed", None), pd)

    def hidden(self, x: jax.Array) -> jax.Array:
        """`Z = act(x W_gate) * (x W_up)`: `[B, T, d]` -> `[B, T, F]` in the compute dtype."""
        cd = self.config.precision.compute_dtype
        gate = matmul("btd,df->btf", x, self.w_gate[...], cd).astype(cd).astype(jnp.float32)
        up = matmul("btd,df->btf", x, self.w_up[...], cd).astype(cd).astype(jnp.float32)
        return (ACTIVATIONS[self.config.activation](gate) * up).astype(cd)

    def _targets(self, x: jax.Array, embeddings: jax.Array | None) -> jax.Array:
        c = self.config
        if c.target_source == "input":
            return x.astype(c.precision.compute_dtype)
        if embeddings is None:
            raise ValueError("embeddings (X0) are required with target_source='embeddings'")
        check_shapes([("x", x, ("B", "T", c.d_model)), ("embeddings", embeddings, ("B", "T", "d"))])
        return embeddings.astype(c.precision.compute_dtype)

    def _op(self, z, target, **kw):
        c = self.config
        return inplace_ttt(
            z,
            target,
            w_down=self.w_down[...],
            w_target=self.ttt_proj[...],
            conv_kernel=self.ttt_conv[...],
            eta=c.eta,
            chunk_size=c.chunk_size,
            conv_mode=c.conv_mode,
            clip_tau=c.clip_tau,
            checkpoint_group=c.checkpoint_group,
            remat_policy=c.remat_policy,
            state_dtype=c.precision.state_dtype,
            prefix=c.prefix,
            backward=c.backward,
            **kw,
        )

    def __call__(
        self,
        x: jax.Array,
        embeddings: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Applies the MLP to whole sequences.

        Args:
          x: `[B, T, d]` MLP input (already normalised by the block).
          embeddings: `[B, T, d]` token embeddings X0 (needed with `target_source=
            "embeddings"`, ignored otherwise and when `ttt=False`).
          segment_ids: `[B, T]` integer document ids of packed sequences (`inplace_ttt`).

        Returns:
          `y: [B, T, d]` in the compute dtype.
        """
        c, cd = self.config, self.config.precision.compute_dtype
        check_layer_input(x, c.d_model)
        z = self.hidden(x)
        if not c.ttt:
            return matmul("btf,df->btd", z, self.w_down[...], cd).astype(cd)
        y, _ = self._op(z, self._targets(x, embeddings), segment_ids=segment_ids)
        return y

    def init_cache(self, batch_size: int) -> InPlaceCache:
        """An empty streaming cache: the fast weight at `w_down`, no pending tokens."""
        c = self.config
        pr = c.precision
        w = jnp.broadcast_to(
            self.w_down[...].astype(pr.state_dtype), (batch_size, c.d_model, c.d_ff)
        )
        return InPlaceCache(
            w=w,
            z=jnp.zeros((batch_size, c.chunk_size, c.d_ff), pr.compute_dtype),
            x0=jnp.zeros((batch_size, c.chunk_size, c.d_model), pr.compute_dtype),
            count=jnp.zeros((), jnp.int32),
        )

    def prefill(
        self, x: jax.Array, embeddings: jax.Array | None = None
    ) -> tuple[jax.Array, InPlaceCache]:
        """Runs a prompt (`[B, T, d]`) from an empty cache; returns `y` and the cache after it."""
        c = self.config
        check_layer_input(x, c.d_model)
        b, t = x.shape[:2]
        z = self.hidden(x)
        target = self._targets(x, embeddings)
        y, state = self._op(z, target)
        rest = t % c.chunk_size
        cache = self.init_cache(b)
        pending = dict(z=z[:, t - rest :], x0=target[:, t - rest :])
        return y, cache.replace(
            w=state.w_down,
            z=lax.dynamic_update_slice_in_dim(cache.z, pending["z"], 0, axis=1),
            x0=lax.dynamic_update_slice_in_dim(cache.x0, pending["x0"], 0, axis=1),
            count=jnp.asarray(rest, jnp.int32),
        )

    def decode(
        self, x: jax.Array, cache: InPlaceCache, embeddings: jax.Array | None = None
    ) -> tuple[jax.Array, InPlaceCache]:
        """One token (`x: [B, 1, d]`, `embeddings: [B, 1, d]`): its output and the new cache."""
        c, cd = self.config, self.config.precision.compute_dtype
        check_shapes([("x", x, ("B", 1, c.d_model))])
        check_layer_input(x, c.d_model)
        check_cache(cache, InPlaceCache, lambda cache: cache.w.shape[0], x.shape[0])
        z = self.hidden(x)
        target = self._targets(x, embeddings)
        y = matmul("btf,bdf->btd", z, cache.w, cd).astype(cd)
        zb = lax.dynamic_update_slice_in_dim(cache.z, z, cache.count, axis=1)
        xb = lax.dynamic_update_slice_in_dim(cache.x0, target, cache.count, axis=1)
        count = cache.count + 1
        full = count == c.chunk_size

        def learn(w):
            return self._op(zb, xb, initial_state=InPlaceState(w_down=w))[1].w_down

        w = lax.cond(full, learn, lambda w: w, cache.w)
        return y, InPlaceCache(w=w, z=zb, x0=xb, count=jnp.where(full, 0, count))


def _diagonal(std: float):
    """A diagonal `[d, d]` initializer with `N(0, std^2)` diagonal entries."""

    def init(key, shape, dtype):
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"a diagonal init needs a square shape, got {shape}")
        return jnp.diag(std * jax.random.normal(key, (shape[0],), dtype))

    return init
