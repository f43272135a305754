"""The layer families a block can hold, by name: the one description of each family.

A `Family` entry says everything the model, the memory tools and the trainer need to know:

- `layer`, `layer_config`, `options`: the NNX class, and how its config is made from what the
  model shares with every layer (`Shared`) and the family's options (the `ModelConfig` section
  named by `options`: `attention`, `ttt`, `lact`, `inplace` or `npt`);
- `inputs`, `aux`: the side inputs its call takes and whether it returns an auxiliary loss
  (the layer interface of `ttt_jax.layers`), so that `Family.call` calls any of them;
- `recurrent`: it runs a chunk scan, which its options' `checkpoint_group` / `remat_policy`
  act on; `chunk_field`: the layer-config field holding its tokens per fast-weight update;
- `resets_at_segments`, `fast_weights`, `flops` (below).

Document boundaries (`segment_ids`): attention masks across segments; In-Place TTT restarts
its chunks and fast weight at each segment; TTT-Linear / TTT-MLP restart their q/k convs, RoPE
positions, mini-batches and fast weights at each document (the Pallas kernel does not take
segment ids yet: with them the TTT layers run the XLA scan); LaCT masks its window attention
across documents, counts its RoPE positions from each document's start and restarts its
chunks and fast weights (slow weights, zero momentum) at each document. A packed row then
gives every document the outputs it would get alone. `resets_at_segments` records this per
family.

`fast_weights` names the parameters that are a fast weight's initial value (the optimizer
exempts them from weight decay: decaying them would pull the inner model's start towards 0,
which the inner loop then has to undo every sequence). In-Place TTT's fast weight starts at the
MLP's own down projection, an ordinary (decayed) MLP weight.

`flops(layer_config, seq_len)` estimates a layer's forward FLOPs per token beyond the
`2 * params` of its projections (attention scores, TTT inner steps); `ttt_jax.models.counting`
sums them for MFU.

Adding a family: its layer and config in `ttt_jax.layers`, its options class in
`ttt_jax.models.options` with a field of `ModelConfig`, and one entry here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layers.attention import Attention, AttentionConfig
from ttt_jax.layers.inplace_mlp import InPlaceMLP, InPlaceMLPConfig
from ttt_jax.layers.lact import LaCTConfig, LaCTLayer
from ttt_jax.layers.mlp import SwiGLU, SwiGLUConfig
from ttt_jax.layers.npt_mlp import NPTMLP, NPTMLPConfig
from ttt_jax.layers.ttt_layer import TTTConfig, TTTLayer
from ttt_jax.models.options import (
    AttentionOptions,
    InPlaceOptions,
    LaCTOptions,
    NPTOptions,
    Shared,
    TTTOptions,
)


def _no_flops(config: Any, seq_len: int) -> float:
    del config, seq_len
    return 0.0


@dataclasses.dataclass(frozen=True)
class Family:
    """One layer family as a block part (module docstring).

    Attributes:
      layer: the NNX class, built as `layer(config, rngs=rngs)`.
      layer_config: `(Shared, options) -> config` (options None for a family without any).
      options: the `ModelConfig` field holding the family's options, or None.
      inputs: the block's side inputs the call takes, by keyword (`positions`, `segment_ids`,
        `embeddings`, `a`: the mixer's output, NPT's modulating signal).
      aux: the call returns `(y, aux)`, an fp32 scalar auxiliary loss, rather than `y`.
      recurrent: the layer runs a chunk scan that `checkpoint_group` / `remat_policy` act on.
      chunk_field: the layer-config field with the tokens per fast-weight update (None: 1).
      resets_at_segments: a packed document gets the outputs it would get alone.
      fast_weights: parameter names that are a fast weight's initial value.
      flops: `(layer config, seq_len) -> forward FLOPs per token beyond 2 * params`.
    """

    layer: type[nnx.Module]
    layer_config: Callable[[Shared, Any], Any]
    options: str | None = None
    inputs: tuple[str, ...] = ()
    aux: bool = False
    recurrent: bool = False
    chunk_field: str | None = None
    resets_at_segments: bool = True
    fast_weights: tuple[str, ...] = ()
    flops: Callable[[Any, int], float] = _no_flops

    def call(self, layer: nnx.Module, x: jax.Array, **inputs) -> tuple[jax.Array, jax.Array]:
        """`(y, aux)` of the layer on `x: [B, T, d]`, given the block's side inputs by name
        (those the family does not take are not passed); aux is 0 unless the layer has one."""
        out = layer(x, **{name: inputs[name] for name in self.inputs})
        return out if self.aux else (out, jnp.zeros((), jnp.float32))

    def chunk(self, config: Any) -> int:
        """Tokens per fast-weight update of a layer config of this family (1: none)."""
        return 1 if self.chunk_field is None else getattr(config, self.chunk_field)


def _attention(s: Shared, o: AttentionOptions) -> AttentionConfig:
    fields = dataclasses.asdict(o)
    head_dim = fields.pop("head_dim")
    return AttentionConfig(
        d_model=s.d_model,
        num_heads=s.num_heads,
        head_dim=s.d_model // s.num_heads if head_dim is None else head_dim,
        window=s.window,
        rope_theta=s.rope_theta,
        implementation=s.attention_impl,
        precision=s.precision,
        norm_eps=s.norm_eps,
        **fields,
    )


def _attention_flops(c: AttentionConfig, t: int) -> float:
    # q k^T and p v: 2 matmuls of 2 * keys * (H * Dh) FLOPs; a causal query sees (t + 1) / 2
    # keys on average, a windowed one at most `window`.
    keys = (t + 1) / 2 if c.window is None else min(c.window, (t + 1) / 2)
    return 4.0 * keys * c.num_heads * c.head_dim


def _shared(s: Shared, *names: str) -> dict[str, Any]:
    """The named fields of `Shared`, as keyword arguments of a layer config."""
    return {name: getattr(s, name) for name in names}


def _ttt_flops(c: TTTConfig, t: int) -> float:
    # The inner model runs forward on k, backward for the gradient, and forward on q: about
    # 3 passes of its 2 * (inner params) FLOPs; the dual form's in-chunk q k^T and E G terms
    # add 2 * 2 * C * D per token.
    d = c.head_dim
    inner_params = d * d if c.inner == "linear" else 2 * d * c.mlp_ratio * d
    return c.num_heads * (3 * 2 * inner_params + 4 * c.mini_batch_size * d)


def _ttt_family(inner: str, fast_weights: tuple[str, ...]) -> Family:
    def config(s: Shared, o: TTTOptions) -> TTTConfig:
        fields = _shared(s, "d_model", "num_heads", "precision")
        return TTTConfig(inner=inner, **fields, **dataclasses.asdict(o))

    return Family(
        TTTLayer,
        config,
        options="ttt",
        inputs=("segment_ids",),
        recurrent=True,
        chunk_field="mini_batch_size",
        fast_weights=fast_weights,
        flops=_ttt_flops,
    )


def _lact(s: Shared, o: LaCTOptions) -> LaCTConfig:
    heads = s.num_heads if o.num_fw_heads is None else o.num_fw_heads
    rank = o.rank
    if isinstance(rank, int) and isinstance(heads, int) and heads > 0:
        # Capped at the fast weight's widths (LaCTOptions); LaCTConfig checks everything else.
        width = s.d_model // heads
        rank = min(rank, width if o.fw_hidden is None else min(o.fw_hidden, width))
    shared = _shared(s, "d_model", "num_heads", "rope_theta", "attention_impl", "precision")
    return LaCTConfig(**shared, **dict(dataclasses.asdict(o), num_fw_heads=heads, rank=rank))


def _lact_flops(c: LaCTConfig, t: int) -> float:
    # The window attention branch, plus per token: the SwiGLU fast weight's apply on q
    # (3 matmuls of 2 * D * D) and its gradient terms on k (about 2 passes more), per head.
    d = c.fw_head_dim
    window = min(c.window, (t + 1) / 2)
    return 4.0 * window * c.d_model + c.num_fw_heads * 3 * 3 * 2 * d * d


def _swiglu(s: Shared, options: None) -> SwiGLUConfig:
    del options
    return SwiGLUConfig(**_shared(s, "d_model", "d_ff", "precision"))


def _inplace(s: Shared, o: InPlaceOptions) -> InPlaceMLPConfig:
    return InPlaceMLPConfig(**_shared(s, "d_model", "d_ff", "precision"), **dataclasses.asdict(o))


def _inplace_flops(c: InPlaceMLPConfig, t: int) -> float:
    # Delta = V^T Z per chunk and the prefix read Z S^T: 2 * 2 * d * F per token, plus the
    # target projection (d * d, in the params count already).
    return 4.0 * c.d_model * c.d_ff


def _npt(s: Shared, o: NPTOptions) -> NPTMLPConfig:
    return NPTMLPConfig(**_shared(s, "d_model", "d_ff", "precision"), **dataclasses.asdict(o))


MIXERS: dict[str, Family] = {
    "attention": Family(
        Attention,
        _attention,
        options="attention",
        inputs=("positions", "segment_ids"),
        flops=_attention_flops,
    ),
    "ttt_linear": _ttt_family("linear", ("W1", "b1")),
    "ttt_mlp": _ttt_family("mlp", ("W1", "b1", "W2", "b2")),
    "lact": Family(
        LaCTLayer,
        _lact,
        options="lact",
        inputs=("segment_ids",),
        recurrent=True,
        chunk_field="chunk_size",
        fast_weights=("w0", "w1", "w2", "w0_left", "w0_right", "w2_left", "w2_right"),
        flops=_lact_flops,
    ),
}

MLPS: dict[str, Family] = {
    "swiglu": Family(SwiGLU, _swiglu),
    "inplace_ttt": Family(
        InPlaceMLP,
        _inplace,
        options="inplace",
        inputs=("embeddings", "segment_ids"),
        recurrent=True,
        chunk_field="chunk_size",
        flops=_inplace_flops,
    ),
    "npt": Family(NPTMLP, _npt, options="npt", inputs=("a",), aux=True),
}

# Every family by name (mixer and MLP names do not collide).
FAMILIES: dict[str, Family] = {**MIXERS, **MLPS}
