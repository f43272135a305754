"""The decoder LM: presets and their baselines, block patterns from the registry, the layer
scan, block remat (same gradients whatever the policy), segment ids (a packed sequence equals
its documents alone), sliding-window attention, mixed precision, bad names."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers.attention import causal_attention
from ttt_jax.models import (
    LM,
    MIXERS,
    MLPS,
    PRESETS,
    InPlaceOptions,
    LaCTOptions,
    ModelConfig,
    flops_per_token,
    param_counts,
    preset,
)
from ttt_jax.testing import micro_model, rel_err

MICRO = micro_model(inplace=InPlaceOptions(chunk_size=4))


def tokens(b=2, t=16, seed=0, vocab=64):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def params_and_graph(cfg):
    model = LM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


@pytest.mark.parametrize(
    "name,low,high", [("tiny", 0.5e6, 1.5e6), ("125m", 100e6, 130e6), ("350m", 300e6, 380e6)]
)
def test_presets_param_counts_and_baselines(name, low, high):
    assert low < param_counts(preset(name))["total"] < high
    base = preset(f"{name}-attn")
    assert {m for m, _ in base.blocks} == {"attention"}
    mixers = [m for m, _ in preset(name).blocks]
    assert mixers[0::2] == ["attention"] * (len(mixers) // 2)
    assert set(mixers[1::2]) == {"ttt_linear"}
    assert set(PRESETS) >= {"tiny", "125m", "350m", "760m", "760m-attn"}


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny, 125m"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown mixer 'mamba'.*attention, ttt_linear, ttt_mlp"):
        ModelConfig(pattern=("mamba/swiglu",))
    with pytest.raises(ValueError, match="unknown mlp 'moe'.*swiglu, inplace_ttt, npt"):
        ModelConfig(pattern=("attention/moe",))
    with pytest.raises(ValueError, match="must be 'mixer/mlp'"):
        ModelConfig(pattern=("attention",))
    with pytest.raises(ValueError, match="num_layers=3 is not a multiple of the pattern length 2"):
        ModelConfig(num_layers=3)
    with pytest.raises(ValueError, match="block_remat"):
        ModelConfig(block_remat="some")


def test_layer_scan_stacks_params_with_a_layers_axis():
    cfg = dataclasses.replace(MICRO, num_layers=4)
    model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    block0 = specs["groups"]["blocks"][0]
    assert tuple(block0["mixer"]["W_q"]) == ("layers", "embed", "heads", "head_dim")
    assert model.groups.blocks[1].mixer.W1.shape[0] == cfg.repeats == 2
    assert tuple(specs["embed"]) == ("vocab", "embed")


def test_forward_under_bf16_policy():
    cfg = dataclasses.replace(
        MICRO, precision="bf16", tie_embeddings=False, pattern=("attention/swiglu",)
    )
    model = LM(cfg, rngs=nnx.Rngs(0))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    logits, aux = nnx.jit(lambda m, t: m(t))(model, tokens())
    assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
    assert aux.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def _grads(cfg):
    graphdef, params = params_and_graph(cfg)
    tok = tokens()

    def loss(p):
        logits, aux = nnx.merge(graphdef, p)(tok)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]) + aux

    return jax.jit(jax.grad(loss))(params)


def test_block_remat_policies_give_the_same_gradients():
    one = dataclasses.replace(MICRO, pattern=("ttt_linear/swiglu",), num_layers=1)
    ref = _grads(one)
    for policy in ("full", "save_names:mixer_out,mid_residual"):
        got = _grads(dataclasses.replace(one, block_remat=policy))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            assert rel_err(a, b) < 1e-5, policy


@pytest.mark.parametrize(
    "pattern", [("attention/inplace_ttt",), ("ttt_linear/swiglu",), ("ttt_mlp/swiglu",)]
)
def test_packed_documents_equal_documents_alone(pattern):
    # Attention masks across segments, In-Place TTT and TTT-Linear / TTT-MLP restart at them:
    # packing is exact. Documents of 7 and 9 tokens: neither a multiple of the mini-batch.
    cfg = dataclasses.replace(MICRO, pattern=pattern, num_layers=1)
    graphdef, params = params_and_graph(cfg)
    # Make the In-Place fast weight matter (its official init makes the update ~0).
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.3 * jax.random.normal(jax.random.key(len(path)), x.shape)
            if "ttt_conv" in str(path) or "ttt_proj" in str(path)
            else x
        ),
        params,
    )
    apply = jax.jit(lambda p, t, s: nnx.merge(graphdef, p)(t, s)[0])
    a, b = tokens(1, 7, seed=1), tokens(1, 9, seed=2)
    packed = apply(params, jnp.concatenate([a, b], 1), jnp.array([[0] * 7 + [1] * 9]))
    alone_a = apply(params, a, jnp.zeros((1, 7), jnp.int32))
    alone_b = apply(params, b, jnp.zeros((1, 9), jnp.int32))
    assert rel_err(packed[:, :7], alone_a) < 1e-5
    assert rel_err(packed[:, 7:], alone_b) < 1e-5
    unpacked = apply(params, jnp.concatenate([a, b], 1), jnp.zeros((1, 16), jnp.int32))
    assert rel_err(unpacked[:, 7:], alone_b) > 1e-3  # without ids the documents do interact


def test_segment_reset_is_recorded_per_layer():
    assert MIXERS["attention"].resets_at_segments and MLPS["inplace_ttt"].resets_at_segments
    assert MIXERS["ttt_linear"].resets_at_segments and MIXERS["ttt_mlp"].resets_at_segments
    assert MIXERS["lact"].resets_at_segments and MIXERS["lact"].inputs == ("segment_ids",)
    assert MIXERS["ttt_mlp"].fast_weights == ("W1", "b1", "W2", "b2")


def test_every_mixer_and_mlp_builds_and_runs():
    pattern = tuple(f"{m}/{p}" for m, p in zip(MIXERS, list(MLPS) * 4, strict=False))
    assert "lact" in MIXERS
    cfg = dataclasses.replace(
        MICRO, pattern=pattern, num_layers=len(pattern), lact=LaCTOptions(chunk_size=8, window=4)
    )
    model = LM(cfg, rngs=nnx.Rngs(0))
    logits, aux = nnx.jit(lambda m, t: m(t))(model, tokens())
    assert bool(jnp.all(jnp.isfinite(logits))) and logits.shape == (2, 16, 64)


def test_sliding_window_sees_only_the_last_keys():
    d, h, e, t, w = 8, 2, 4, 12, 3
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (1, t, d))
    wq, wk, wv = (jax.random.normal(k, (d, h, e)) for k in ks[1:4])
    wo = jax.random.normal(ks[4], (h, e, d))
    run = jax.jit(
        lambda x: causal_attention(x, wq, wk, wv, wo, jnp.arange(t), 1e4, jnp.float32, window=w)
    )
    y = run(x)
    y2 = run(x.at[:, 5].add(1.0))
    np.testing.assert_allclose(y[:, :5], y2[:, :5], rtol=1e-6)  # causal
    assert not np.allclose(y[:, 5 : 5 + w], y2[:, 5 : 5 + w])  # inside the window
    np.testing.assert_allclose(y[:, 5 + w :], y2[:, 5 + w :], rtol=1e-6)  # past the window


def test_flops_count_grows_with_context_for_attention_only():
    attn, ttt = preset("125m-attn"), preset("125m")
    assert flops_per_token(attn, 8192) - flops_per_token(attn, 1024) > 0
    growth_attn = flops_per_token(attn, 8192) - flops_per_token(attn, 1024)
    growth_ttt = flops_per_token(ttt, 8192) - flops_per_token(ttt, 1024)
    assert growth_ttt == pytest.approx(growth_attn / 2)  # TTT replaced every other attention
