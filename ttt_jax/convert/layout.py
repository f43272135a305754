"""Where each tensor of a Hugging Face checkpoint goes in the ttt-jax LM, and how it changes.

Per layer l (`model.layers.{l}.`), for block parameters at row `l // P` of period position
`l % P` (`ModelConfig.period`; P = 1 for an imported model):

| ttt-jax (block) | Hugging Face | change |
|---|---|---|
| mixer_norm, mlp_norm `[d]` | input_layernorm, post_attention_layernorm | - |
| mixer.W_q `[d, H, Dh]` | self_attn.q_proj.weight `[H Dh, d]` | transpose, heads, RoPE order |
| mixer.W_k, W_v `[d, Hkv, Dh]` | k_proj, v_proj | the same (W_v without the RoPE order) |
| mixer.W_o `[H, Dh, d]` | o_proj.weight `[d, H Dh]` | transpose, heads |
| mixer.b_q, b_k, b_v `[., Dh]`, b_o `[d]` | the projections' biases | heads (q, k: RoPE order) |
| mixer.q_norm, k_norm `[Dh]` | self_attn.q_norm, k_norm | RoPE order |
| mlp.W_gate, W_up `[d, F]`, W_down `[F, d]` | mlp.gate_proj, up_proj, down_proj | transpose |

and `embed` <- `model.embed_tokens.weight`, `final_norm` <- `model.norm.weight`, `head [d, V]`
<- `lm_head.weight` transposed (untied models).

The RoPE order: Hugging Face rotates the pairs `(x_i, x_{i + Dh/2})` ("rotate half"),
ttt-jax the pairs `(x_{2i}, x_{2i+1})`, both at frequency i. Reordering the head dim of q and k
by `ROPE_ORDER` (`[0, Dh/2, 1, Dh/2 + 1, ...]`) turns one into the other, and since q and k are
reordered alike their products, so the attention, are unchanged. Everything applied per head
dim before RoPE (the q/k biases and RMSNorm scales) takes the same order; v is not rotated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ttt_jax.models.config import ModelConfig


def rope_order(head_dim: int) -> np.ndarray:
    """`[Dh]` indices: ttt-jax's head dim j holds the Hugging Face head dim `order[j]`."""
    half = head_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=-1).reshape(-1)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its path in a block (or the model), its checkpoint name, and the maps
    `to_ours(hf array) -> ttt-jax array` and `to_hf(ttt-jax array) -> hf array`."""

    path: tuple[str, ...]
    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _in_heads(heads: int, head_dim: int, order: np.ndarray | None) -> tuple[Callable, Callable]:
    """`[heads Dh, d]` <-> `[d, heads, Dh]` (a projection into heads)."""

    def to_ours(w):
        w = w.T.reshape(w.shape[1], heads, head_dim)
        return w if order is None else w[..., order]

    def to_hf(w):
        if order is not None:
            w = w[..., np.argsort(order)]
        return w.reshape(w.shape[0], heads * head_dim).T

    return to_ours, to_hf


def _bias_heads(heads: int, head_dim: int, order: np.ndarray | None) -> tuple[Callable, Callable]:
    def to_ours(b):
        b = b.reshape(heads, head_dim)
        return b if order is None else b[..., order]

    def to_hf(b):
        return (b if order is None else b[..., np.argsort(order)]).reshape(-1)

    return to_ours, to_hf


def _out_heads(heads: int, head_dim: int) -> tuple[Callable, Callable]:
    """`[d, heads Dh]` <-> `[heads, Dh, d]` (the output projection)."""

    def to_ours(w):
        return w.T.reshape(heads, head_dim, w.shape[0])

    def to_hf(w):
        return w.reshape(heads * head_dim, w.shape[-1]).T

    return to_ours, to_hf


def _ordered(order: np.ndarray) -> tuple[Callable, Callable]:
    return (lambda x: x[..., order]), (lambda x: x[..., np.argsort(order)])


def block_entries(config: ModelConfig) -> list[Entry]:
    """The parameters of one `attention/swiglu` block, names relative to `model.layers.{l}.`."""
    a = config.layer_config("attention")
    h, hkv, e = a.num_heads, a.kv_heads, a.head_dim
    order = rope_order(e)
    attn = "self_attn."
    entries = [
        Entry(("mixer_norm",), "input_layernorm.weight", _identity, _identity),
        Entry(("mlp_norm",), "post_attention_layernorm.weight", _identity, _identity),
        Entry(("mixer", "W_q"), attn + "q_proj.weight", *_in_heads(h, e, order)),
        Entry(("mixer", "W_k"), attn + "k_proj.weight", *_in_heads(hkv, e, order)),
        Entry(("mixer", "W_v"), attn + "v_proj.weight", *_in_heads(hkv, e, None)),
        Entry(("mixer", "W_o"), attn + "o_proj.weight", *_out_heads(h, e)),
        Entry(("mlp", "W_gate"), "mlp.gate_proj.weight", _transpose, _transpose),
        Entry(("mlp", "W_up"), "mlp.up_proj.weight", _transpose, _transpose),
        Entry(("mlp", "W_down"), "mlp.down_proj.weight", _transpose, _transpose),
    ]
    if a.qkv_bias:
        entries += [
            Entry(("mixer", "b_q"), attn + "q_proj.bias", *_bias_heads(h, e, order)),
            Entry(("mixer", "b_k"), attn + "k_proj.bias", *_bias_heads(hkv, e, order)),
            Entry(("mixer", "b_v"), attn + "v_proj.bias", *_bias_heads(hkv, e, None)),
        ]
    if a.o_bias:
        entries.append(Entry(("mixer", "b_o"), attn + "o_proj.bias", _identity, _identity))
    if a.qk_norm:
        entries += [
            Entry(("mixer", "q_norm"), attn + "q_norm.weight", *_ordered(order)),
            Entry(("mixer", "k_norm"), attn + "k_norm.weight", *_ordered(order)),
        ]
    return entries


def model_entries(config: ModelConfig) -> list[Entry]:
    """The parameters outside the blocks."""
    entries = [
        Entry(("embed",), "model.embed_tokens.weight", _identity, _identity),
        Entry(("final_norm",), "model.norm.weight", _identity, _identity),
    ]
    if not config.tie_embeddings:
        entries.append(Entry(("head",), "lm_head.weight", _transpose, _transpose))
    return entries


def layer_name(layer: int, entry: Entry) -> str:
    return f"model.layers.{layer}.{entry.name}"


# Checkpoint tensors that hold no parameter: RoPE frequency buffers some exports include, and
# the tied head (`lm_head.weight` of a tied model is the embedding).
def ignorable(name: str, config: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (
        config.tie_embeddings and name == "lm_head.weight"
    )
