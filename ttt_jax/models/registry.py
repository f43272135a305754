"""The mixers and MLPs a block can hold, by name. Adding a layer family is one entry here.

A mixer entry builds the layer from the `ModelConfig` and calls it as
`call(layer, x, positions, segment_ids) -> y` (`x, y: [B, T, d]`). An MLP entry's call is
`call(layer, h, mixer_out, embeddings, segment_ids) -> (y, aux)` with an fp32 scalar auxiliary
loss (0 for all but NPT with a regulariser).

Document boundaries (`segment_ids`): attention masks across segments and In-Place TTT restarts
its chunks and fast weight at each segment. TTT-Linear / TTT-MLP and LaCT do NOT reset: their
fast weights flow from one packed document into the next (the ops have no segment input yet;
the original TTT training packs documents the same way). LaCT's window attention and RoPE also
run over the packed row as one sequence (positions from 0 at the row start).
`resets_at_segments` records this per entry so the model and its users can tell.

`fast_weights` names the parameters that are a fast weight's initial value (the optimizer
exempts them from weight decay: decaying them would pull the inner model's start towards 0,
which the inner loop then has to undo every sequence).

`extra_flops(config, seq_len)` estimates a layer's forward FLOPs per token beyond the
`2 * params` of its projections (attention scores, TTT inner steps); `ttt_jax.models.counting`
sums them for MFU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
from flax import nnx

from ttt_jax.layers.attention import Attention, AttentionConfig
from ttt_jax.layers.inplace_mlp import InPlaceMLP, InPlaceMLPConfig
from ttt_jax.layers.npt_mlp import NPTMLP, NPTMLPConfig
from ttt_jax.layers.ttt_layer import TTTConfig, TTTLayer

if TYPE_CHECKING:
    from ttt_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class MixerEntry:
    build: Callable[[ModelConfig, nnx.Rngs], nnx.Module]
    call: Callable[..., Any]
    resets_at_segments: bool
    extra_flops: Callable[[ModelConfig, int], float]
    fast_weights: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MLPEntry:
    build: Callable[[ModelConfig, nnx.Rngs], nnx.Module]
    call: Callable[..., Any]
    resets_at_segments: bool
    extra_flops: Callable[[ModelConfig, int], float] = lambda c, t: 0.0


def _attention(c: ModelConfig, rngs: nnx.Rngs) -> Attention:
    cfg = AttentionConfig(
        d_model=c.d_model,
        num_heads=c.num_heads,
        head_dim=c.head_dim,
        window=c.window,
        rope_theta=c.rope_theta,
        implementation=c.attention_impl,
        precision=c.mixed_precision,
    )
    return Attention(cfg, rngs=rngs)


def _attention_flops(c: ModelConfig, t: int) -> float:
    # q k^T and p v: 2 matmuls of 2 * keys * d FLOPs; a causal query sees (t + 1) / 2 keys on
    # average, a windowed one at most `window`.
    keys = (t + 1) / 2 if c.window is None else min(c.window, (t + 1) / 2)
    return 4.0 * keys * c.d_model


def _ttt(inner: str):
    def build(c: ModelConfig, rngs: nnx.Rngs) -> TTTLayer:
        cfg = TTTConfig(
            d_model=c.d_model,
            num_heads=c.num_heads,
            inner=inner,
            mini_batch_size=c.ttt_mini_batch,
            base_lr=c.ttt_base_lr,
            backbone=c.ttt_backbone,
            unroll=c.ttt_unroll,
            checkpoint_group=c.checkpoint_group,
            remat_policy=c.inner_remat_policy,
            precision=c.mixed_precision,
        )
        return TTTLayer(cfg, rngs=rngs)

    return build


def _ttt_flops(inner: str):
    def flops(c: ModelConfig, t: int) -> float:
        d, h, mb = c.head_dim, c.num_heads, c.ttt_mini_batch
        # The inner model runs forward on k, backward for the gradient, and forward on q: about
        # 3 passes of its 2 * (inner params) FLOPs; the dual form's in-chunk q k^T and E G terms
        # add 2 * 2 * C * D per token.
        inner_params = d * d if inner == "linear" else 2 * d * 4 * d
        return h * (3 * 2 * inner_params + 4 * mb * d)

    return flops


def _lact(c: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    # Imported here: the LaCT layer is optional for models that do not use it (and it lands in
    # its own module, so a checkout without it still builds every other block).
    from ttt_jax.layers.lact import LaCTConfig, LaCTLayer

    heads = c.lact_heads or c.num_heads
    cfg = LaCTConfig(
        d_model=c.d_model,
        num_heads=c.num_heads,
        num_fw_heads=heads,
        window=c.lact_window,
        chunk_size=c.lact_chunk,
        rank=min(c.lact_rank, c.d_model // heads),
        use_muon=c.lact_muon,
        muon_dtype=c.lact_muon_dtype,
        rope_theta=c.rope_theta,
        attention_impl=c.attention_impl,
        precision=c.mixed_precision,
        checkpoint_group=c.checkpoint_group,
        remat_policy=c.inner_remat_policy,
    )
    return LaCTLayer(cfg, rngs=rngs)


def _lact_flops(c: ModelConfig, t: int) -> float:
    # The window attention branch, plus per token: the SwiGLU fast weight's apply on q
    # (3 matmuls of 2 * D * D) and its gradient terms on k (about 2 passes more), per head.
    d = c.d_model // (c.lact_heads or c.num_heads)
    heads = c.lact_heads or c.num_heads
    window = min(c.lact_window, (t + 1) / 2)
    return 4.0 * window * c.d_model + heads * 3 * 3 * 2 * d * d


def _call_plain(layer, x, positions, segment_ids):
    del positions, segment_ids
    return layer(x)


def _call_first(layer, x, positions, segment_ids):
    del positions, segment_ids
    return layer(x)[0]


def _call_attention(layer, x, positions, segment_ids):
    return layer(x, positions=positions, segment_ids=segment_ids)


def _swiglu(c: ModelConfig, rngs: nnx.Rngs) -> NPTMLP:
    # The NPT MLP without modulation is exactly the plain SwiGLU MLP (one implementation).
    cfg = NPTMLPConfig(
        d_model=c.d_model, d_ff=c.d_ff, modulation="none", precision=c.mixed_precision
    )
    return NPTMLP(cfg, rngs=rngs)


def _npt(c: ModelConfig, rngs: nnx.Rngs) -> NPTMLP:
    cfg = NPTMLPConfig(d_model=c.d_model, d_ff=c.d_ff, rank=c.npt_rank, precision=c.mixed_precision)
    return NPTMLP(cfg, rngs=rngs)


def _inplace(c: ModelConfig, rngs: nnx.Rngs) -> InPlaceMLP:
    cfg = InPlaceMLPConfig(
        d_model=c.d_model,
        d_ff=c.d_ff,
        chunk_size=c.inplace_chunk,
        target_source=c.inplace_target,
        checkpoint_group=c.checkpoint_group,
        remat_policy=c.inner_remat_policy,
    )
    return InPlaceMLP(cfg, precision=c.mixed_precision, rngs=rngs)


def _call_swiglu(layer, h, mixer_out, embeddings, segment_ids):
    del mixer_out, embeddings, segment_ids
    return layer(h)


def _call_npt(layer, h, mixer_out, embeddings, segment_ids):
    del embeddings, segment_ids
    return layer(h, mixer_out)


def _call_inplace(layer, h, mixer_out, embeddings, segment_ids):
    del mixer_out
    return layer(h, embeddings, segment_ids=segment_ids), jnp.zeros((), jnp.float32)


def _inplace_flops(c: ModelConfig, t: int) -> float:
    # Delta = V^T Z per chunk and the prefix read Z S^T: 2 * 2 * d * F per token, plus the
    # target projection (d * d, in the params count already).
    return 4.0 * c.d_model * c.d_ff


MIXERS: dict[str, MixerEntry] = {
    "attention": MixerEntry(_attention, _call_attention, True, _attention_flops),
    "ttt_linear": MixerEntry(
        _ttt("linear"), _call_plain, False, _ttt_flops("linear"), ("W1", "b1")
    ),
    "ttt_mlp": MixerEntry(
        _ttt("mlp"), _call_plain, False, _ttt_flops("mlp"), ("W1", "b1", "W2", "b2")
    ),
    "lact": MixerEntry(
        _lact,
        _call_first,
        False,
        _lact_flops,
        ("w0", "w1", "w2", "w0_left", "w0_right", "w2_left", "w2_right"),
    ),
}

MLPS: dict[str, MLPEntry] = {
    "swiglu": MLPEntry(_swiglu, _call_swiglu, True),
    "inplace_ttt": MLPEntry(_inplace, _call_inplace, True, _inplace_flops),
    "npt": MLPEntry(_npt, _call_npt, True),
}
