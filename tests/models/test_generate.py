"""Decoding (issue 19 part 5): for every layer family, a prompt read by `LM.prefill` and the rest
fed through `LM.decode` in pieces (4 tokens, then one at a time) gives the logits of the whole
sequence at every position (fp32, <= 1e-5 relative): each step equals recomputing the whole
prefix, since position t's logits of the full forward are those of the prefix ending at t
(every family is causal); a retrofitted model (In-Place MLP, gated TTT branch) too.
`generate`: greedy equals an argmax loop that recomputes the prefix every step, `eos_id` stops
a row, nucleus sampling with a tiny `top_p` is greedy, sampling is reproducible from its key,
and bad arguments are ValueErrors naming them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.models import LM, InPlaceOptions, LaCTOptions, ModelConfig, TTTOptions
from ttt_jax.models.decode import STEPS
from ttt_jax.models.generate import generate
from ttt_jax.models.options import AttentionOptions, RetrofitOptions
from ttt_jax.models.registry import FAMILIES
from ttt_jax.testing import OP_TOL, micro_model, rel_err

BASE = micro_model(
    vocab_size=32,
    num_layers=1,
    num_heads=4,
    pattern=("attention/swiglu",),
    ttt=TTTOptions(mini_batch_size=4, checkpoint_group=None, unroll=1),
    lact=LaCTOptions(chunk_size=4, window=3, num_fw_heads=2),
    inplace=InPlaceOptions(chunk_size=4),
)
# Every option of attention on (GQA, q/k norm, biases, llama3 RoPE, a window shorter than the
# sequence), two layers so the cache is stacked over the layer scan.
FULL_ATTENTION = AttentionOptions(
    num_kv_heads=2, head_dim=16, qk_norm=True, qkv_bias=True, o_bias=True,
    rope_scaling="llama3", rope_original_max_positions=8,
)  # fmt: skip
FAMILY_CONFIGS = {
    "attention": dict(
        pattern=("attention/swiglu",), num_layers=2, window=5, attention=FULL_ATTENTION
    ),
    "ttt_linear": dict(pattern=("ttt_linear/swiglu",)),
    "ttt_mlp": dict(pattern=("ttt_mlp/swiglu",)),
    "lact": dict(pattern=("lact/swiglu",)),
    "inplace_ttt": dict(pattern=("attention/inplace_ttt",)),
    "npt": dict(pattern=("attention/npt",)),
    # A retrofitted model (ttt_jax.models.retrofit): an In-Place MLP in layer 0, a gated
    # TTT-Linear branch after layer 1's attention (the gate randomised open, below).
    "retrofit": dict(
        pattern=("attention/swiglu",),
        num_layers=2,
        retrofit=RetrofitOptions(inplace_layers=(0,), branch_layers=(1,), branch="ttt_linear"),
    ),
}
T, PROMPT, PIECES = 9, 3, (4, 1, 1)


def _params(config: ModelConfig, seed: int = 0):
    """The LM's parameters, every one randomised (biases and norms included, so none is inert;
    In-Place TTT's zero-initialised conv too, so its fast weight moves). The `unsafe_rbg` keys
    compile several times faster than threefry on the CPU (a test's cost is its compiles)."""
    key = jax.random.key(seed, impl="unsafe_rbg")
    state = nnx.state(LM(config, rngs=nnx.Rngs(key)), nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    noise = [
        0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, [x + n for x, n in zip(leaves, noise, strict=True)])


def _model(config: ModelConfig, seed: int = 0) -> LM:
    """The randomised LM, built under one jit (an eager init compiles op by op, slowly)."""
    model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(seed)))
    nnx.update(model, jax.jit(lambda: _params(config, seed))())
    return model


def test_every_family_has_a_decoding_step():
    assert set(STEPS) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_decoding_in_pieces_equals_the_whole_sequence(family):
    config = dataclasses.replace(BASE, **FAMILY_CONFIGS[family])
    assert sum(PIECES) == T - PROMPT

    @jax.jit
    def run(tokens):
        # One program per family (init, whole sequence, prefill and every piece): one compile.
        model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
        nnx.update(model, _params(config))
        want = model(tokens)[0]
        got, cache = model.prefill(tokens[:, :PROMPT], T)
        pieces, start = [got], PROMPT
        for n in PIECES:
            logits, cache = model.decode(tokens[:, start : start + n], cache)
            pieces.append(logits)
            start += n
        return want, jnp.concatenate(pieces, axis=1), cache.length

    want, got, length = run(jax.random.randint(jax.random.key(2), (2, T), 0, config.vocab_size))
    for t in range(T):
        assert rel_err(got[:, t], want[:, t]) <= OP_TOL, (family, t, rel_err(got[:, t], want[:, t]))
    assert int(length) == T


@pytest.fixture(scope="module")
def attention_model():
    config = dataclasses.replace(BASE, **FAMILY_CONFIGS["attention"])
    return _model(config)


def test_greedy_generate_equals_recomputing_the_prefix(attention_model):
    model = attention_model
    prompt = np.array([[3, 1, 4, 1], [5, 9, 2, 6]])
    got = np.asarray(generate(model, prompt, 4))
    seq = jnp.asarray(prompt)
    for _ in range(4):
        nxt = jnp.argmax(model(seq)[0][:, -1], axis=-1)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(got, np.asarray(seq[:, 4:]))
    # One row stops at its eos; the other goes on.
    eos = int(got[0, 1])
    stopped = np.asarray(generate(model, prompt, 4, eos_id=eos))
    first = [int(np.argmax(r == eos)) if (r == eos).any() else 4 for r in got]
    for row, f in enumerate(first):
        np.testing.assert_array_equal(stopped[row, : f + 1], got[row, : f + 1])
        assert (stopped[row, f:] == eos).all()
    # A 1-D prompt gives a 1-D result.
    np.testing.assert_array_equal(np.asarray(generate(model, prompt[1], 4)), got[1])


def test_sampling_is_reproducible_and_top_p_narrows_it(attention_model):
    model, prompt, key = attention_model, np.array([[3, 1, 4, 1], [5, 9, 2, 6]]), jax.random.key(7)
    greedy = np.asarray(generate(model, prompt, 4))
    a = np.asarray(generate(model, prompt, 4, temperature=5.0, rng=key))
    np.testing.assert_array_equal(a, generate(model, prompt, 4, temperature=5.0, rng=key))
    # Hot sampling over the whole vocabulary leaves the greedy path (a fixed key: not flaky).
    assert (a != greedy).any()
    nucleus = generate(model, prompt, 4, temperature=5.0, top_p=1e-6, rng=key)
    np.testing.assert_array_equal(nucleus, greedy)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_ids=np.zeros((1, 0), int)), "prompt_ids must be"),
        (dict(prompt_ids=np.array([[1, 40]])), r"prompt_ids must lie in \[0, 32\)"),
        (dict(prompt_ids=np.array([[1.0]])), "integer token ids"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=1.0), "rng"),
        (dict(eos_id=32), "eos_id"),
    ],
)
def test_bad_arguments_name_themselves(attention_model, kwargs, match):
    args = dict(prompt_ids=np.array([[1, 2]]), max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(attention_model, **args)
