"""In-Place TTT MLP layer (SPEC 3.3): config validation, logical axes, the official init (which
makes the layer the plain gated MLP at init, with gradient still reaching the conv), agreement
with the op, and streaming decode equal to one call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers.common import BF16, FP32
from ttt_jax.layers.inplace_mlp import InPlaceMLP, InPlaceMLPConfig
from ttt_jax.ops.inplace.op import inplace_ttt
from ttt_jax.testing import rel_err

Bn, T, D, F, C = 2, 11, 8, 12, 4


def make(precision=FP32, seed=0, **kw):
    base = dict(d_model=D, d_ff=F, chunk_size=C, eta=0.5, precision=precision)
    return InPlaceMLP(InPlaceMLPConfig(**dict(base, **kw)), rngs=nnx.Rngs(seed))


def inputs(seed=1, t=T):
    kx, ke = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (Bn, t, D)), jax.random.normal(ke, (Bn, t, D))


def learned(model, seed=2):
    """Non-zero conv taps and a dense W_target, as after some training."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    model.ttt_conv[...] = jax.random.normal(k1, model.ttt_conv[...].shape)
    model.ttt_proj[...] = 0.3 * jax.random.normal(k2, (D, D))
    return model


@pytest.mark.parametrize(
    "field,value",
    [
        ("d_model", 0),
        ("d_ff", -1),
        ("chunk_size", 2.0),
        ("conv_mode", "causal"),
        ("target_source", "output"),
        ("activation", "relu"),
        ("eta", float("nan")),
        ("clip_tau", 0.0),
        ("ttt", 1),
        ("prefix", "tree"),
        ("backward", "manual"),
        ("checkpoint_group", 0),
        ("remat_policy", "bogus"),
    ],
)
def test_config_errors_name_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=field) as err:
        InPlaceMLPConfig(**{"d_model": D, "d_ff": F, field: value})
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_every_param_has_logical_axis_names_and_the_official_init():
    model = make()
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    # flax 0.12 keeps `sharding_names=` under `out_sharding`; older releases kept the name.
    meta = {k: v.get_metadata() for k, v in params.items()}
    axes = {
        k: m["out_sharding"] if "out_sharding" in m else m["sharding_names"]
        for k, m in meta.items()
    }
    shapes = {k: v[...].shape for k, v in params.items()}
    want = {
        ("w_gate",): (("embed", "mlp"), (D, F)),
        ("w_up",): (("embed", "mlp"), (D, F)),
        ("w_down",): (("embed", "mlp"), (D, F)),
        ("ttt_conv",): (("conv", "embed"), (5, D)),
        ("ttt_proj",): (("embed", None), (D, D)),
    }
    assert {k: (tuple(axes[k]), shapes[k]) for k in axes} == want
    assert float(jnp.abs(model.ttt_conv[...]).max()) == 0.0
    proj = np.asarray(model.ttt_proj[...])
    assert np.count_nonzero(proj - np.diag(np.diag(proj))) == 0
    big = make(d_model=512, d_ff=16)
    assert 0.018 < float(jnp.std(jnp.diag(big.ttt_proj[...]))) < 0.022
    assert make(conv_mode="causal_next").ttt_conv[...].shape == (2, D)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_at_init_the_layer_is_the_plain_gated_mlp(activation):
    x, emb = inputs()
    model = make(activation=activation)
    plain = make(activation=activation, ttt=False)
    y, y_plain = model(x, emb), plain(x)
    act = {"silu": jax.nn.silu, "gelu_tanh": lambda u: jax.nn.gelu(u, approximate=True)}
    z = act[activation](x @ model.w_gate[...]) * (x @ model.w_up[...])
    np.testing.assert_array_equal(y, y_plain)
    assert rel_err(y, z @ model.w_down[...].T) <= 1e-6
    # Packed documents too: every document starts at W_down and learns nothing at init.
    seg = jnp.asarray(np.repeat([[0, 1, 2]], Bn, 0).repeat([5, 2, 4], axis=1), jnp.int32)
    assert rel_err(model(x, emb, segment_ids=seg), y_plain) <= 1e-6


def test_at_init_gradient_still_reaches_the_conv():
    x, emb = inputs()
    model = make()
    ct = jax.random.normal(jax.random.key(3), (Bn, T, D))

    def loss(model):
        return jnp.sum(model(x, emb) * ct)

    grads = nnx.grad(loss)(model)
    assert float(jnp.abs(grads["ttt_conv"][...]).max()) > 1e-3


@pytest.mark.parametrize("source", ["embeddings", "input"])
def test_layer_is_the_op_on_its_hidden_activations_and_targets(source):
    x, emb = inputs()
    model = learned(make(target_source=source))
    z = model.hidden(x)
    target = emb if source == "embeddings" else x
    want, _ = inplace_ttt(
        z,
        target,
        w_down=model.w_down[...],
        w_target=model.ttt_proj[...],
        conv_kernel=model.ttt_conv[...],
        eta=0.5,
        chunk_size=C,
    )
    got = model(x, emb if source == "embeddings" else None)
    np.testing.assert_array_equal(got, want)
    assert rel_err(got, make(ttt=False)(x)) > 1e-2  # it does learn something


def test_embeddings_are_required_for_the_embeddings_source():
    x, _ = inputs()
    with pytest.raises(ValueError, match="embeddings"):
        make()(x)
    with pytest.raises(ValueError, match="embeddings"):
        make()(x, jnp.zeros((Bn, T + 1, D)))


@pytest.mark.parametrize("t0", [0, 5, 8])
def test_prefill_then_token_by_token_decode_equals_one_call(t0):
    x, emb = inputs(t=3 * C + 2)
    model = learned(make())
    want = model(x, emb)
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode(state, x_t, e_t, cache):
        return nnx.merge(graphdef, state).decode(x_t, cache, e_t)

    if t0:
        y0, cache = nnx.jit(lambda m, x, e: m.prefill(x, e))(model, x[:, :t0], emb[:, :t0])
        outs = [y0]
    else:
        cache, outs = model.init_cache(Bn), []
    assert int(cache.count) == t0 % C
    for t in range(t0, x.shape[1]):
        y_t, cache = decode(state, x[:, t : t + 1], emb[:, t : t + 1], cache)
        outs.append(y_t)
    assert rel_err(jnp.concatenate(outs, 1), want) <= 1e-5
    _, s_want = inplace_ttt(
        model.hidden(x),
        emb,
        w_down=model.w_down[...],
        w_target=model.ttt_proj[...],
        conv_kernel=model.ttt_conv[...],
        eta=0.5,
        chunk_size=C,
    )
    assert rel_err(cache.w, s_want.w_down) <= 1e-5
    assert int(cache.count) == x.shape[1] % C


def test_bf16_compute_keeps_fp32_params_and_state():
    x, emb = inputs()
    model = learned(make(precision=BF16))
    y = model(x, emb)
    assert y.dtype == jnp.bfloat16 and model.w_down[...].dtype == jnp.float32
    _, cache = model.prefill(x, emb)
    assert cache.w.dtype == jnp.float32 and cache.z.dtype == jnp.bfloat16
    y32 = learned(make())(x, emb)
    assert rel_err(y, y32) <= 2e-2
