"""Attention's checkpoint options (issue 19 part 1): `AttentionOptions` mirrors the layer
config, every option is off by default (the plain layer's parameters and outputs), grouped
query heads equal full heads with each key/value head repeated over its group, and the
optional pieces, when inert, give the plain layer's outputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.layers import Attention, AttentionConfig
from ttt_jax.models import AttentionOptions, ModelConfig
from ttt_jax.testing import OP_TOL, rel_err

# Fields the model sets itself rather than through the options.
SET_BY_MODEL = {"d_model", "num_heads", "window", "rope_theta", "implementation", "precision"}


def test_options_mirror_the_layer_config_and_default_to_off():
    layer = {f.name: f for f in dataclasses.fields(AttentionConfig)}
    options = {f.name: f for f in dataclasses.fields(AttentionOptions)}
    assert set(options) | SET_BY_MODEL | {"norm_eps"} == set(layer)
    for name, field in options.items():
        if name != "head_dim":  # None: d_model / num_heads
            assert field.default == layer[name].default, name
    model = ModelConfig(d_model=32, num_heads=4, norm_eps=1e-5)
    assert model.layer_config("attention") == AttentionConfig(
        d_model=32, num_heads=4, head_dim=8, precision=model.mixed_precision, norm_eps=1e-5
    )
    params = nnx.state(Attention(AttentionConfig(8, 2, 4), rngs=nnx.Rngs(0)), nnx.Param)
    assert set(nnx.to_pure_dict(params)) == {"W_q", "W_k", "W_v", "W_o"}


def _x(t=7):
    return jax.random.normal(jax.random.key(1), (2, t, 16), jnp.float32)


def test_grouped_query_heads_are_shared_key_value_heads():
    gqa = Attention(AttentionConfig(16, 4, 8, num_kv_heads=2, window=4), rngs=nnx.Rngs(0))
    full = Attention(AttentionConfig(16, 4, 8, window=4), rngs=nnx.Rngs(0))
    full.W_q[...], full.W_o[...] = gqa.W_q[...], gqa.W_o[...]
    # Query heads 0, 1 read kv head 0; heads 2, 3 kv head 1.
    full.W_k[...] = jnp.repeat(gqa.W_k[...], 2, axis=1)
    full.W_v[...] = jnp.repeat(gqa.W_v[...], 2, axis=1)
    assert gqa.W_k.shape == (16, 2, 8)
    graphdef, state = nnx.split(gqa)

    @jax.jit
    def pieces(state, x):
        layer = nnx.merge(graphdef, state)
        y, cache = layer.prefill(x[:, :3], 7)
        ys = [y]
        for t in range(3, 7):
            y, cache = layer.decode(x[:, t : t + 1], cache)
            ys.append(y)
        return layer(x), jnp.concatenate(ys, 1), cache.k.shape

    x = _x()
    whole, decoded, cache_shape = pieces(state, x)
    want = full(x)
    assert rel_err(whole, want) <= OP_TOL
    # The KV cache of the grouped layer holds 2 heads and decodes to the same outputs.
    assert cache_shape == (2, 7, 2, 8)
    assert rel_err(decoded, want) <= OP_TOL


def test_inert_options_give_the_plain_layer():
    config = AttentionConfig(16, 4, 4)
    plain = Attention(config, rngs=nnx.Rngs(0))
    every = dataclasses.replace(config, qkv_bias=True, o_bias=True, qk_norm=True)
    rich = Attention(every, rngs=nnx.Rngs(0))
    # The optional parameters are drawn after the plain ones: the same weights.
    for name in ("W_q", "W_k", "W_v", "W_o"):
        np.testing.assert_array_equal(getattr(rich, name)[...], getattr(plain, name)[...])
    # Zero biases are inert, and so is llama3 scaling with factor 1 (every frequency kept).
    x = _x()
    for inert in (
        dataclasses.replace(config, qkv_bias=True, o_bias=True),
        dataclasses.replace(config, rope_scaling="llama3", rope_factor=1.0),
    ):
        assert rel_err(Attention(inert, rngs=nnx.Rngs(0))(x), plain(x)) <= OP_TOL
