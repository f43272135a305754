"""TTT layers: streaming decode equals one call, config validation, axis names, precision."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ttt_jax.layers import BF16, TTTMLP, MixedPrecision, TTTConfig, TTTLayer, TTTLinear
from ttt_jax.testing import rel_err


@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_token_by_token_equals_one_call(backbone, inner):
    config = TTTConfig(d_model=32, num_heads=4, inner=inner, mini_batch_size=4, backbone=backbone)
    layer = TTTLayer(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 32))
    y = layer(x)
    cache = layer.init_cache(2)
    pieces = []
    for t in range(11):
        y_t, cache = layer.decode(x[:, t : t + 1], cache)
        pieces.append(y_t)
    assert rel_err(jnp.concatenate(pieces, 1), y) <= 1e-5
    assert cache.q.shape == (2, 11 % 4, 4, 8)  # three tokens of the last mini-batch pending
    # Uneven pieces (crossing mini-batch boundaries mid-piece) give the same outputs.
    cache = layer.init_cache(2)
    outs = []
    for a, b in [(0, 3), (3, 9), (9, 11)]:
        y_p, cache = layer.decode(x[:, a:b], cache)
        outs.append(y_p)
    assert rel_err(jnp.concatenate(outs, 1), y) <= 1e-5


def test_decode_under_jit():
    layer = TTTLayer(TTTConfig(d_model=16, num_heads=2, mini_batch_size=4), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 16))
    graphdef, params = nnx.split(layer)

    @jax.jit
    def step(params, x_t, cache):
        return nnx.merge(graphdef, params).decode(x_t, cache)

    cache, outs = layer.init_cache(1), []
    for t in range(6):
        y_t, cache = step(params, x[:, t : t + 1], cache)
        outs.append(y_t)
    assert rel_err(jnp.concatenate(outs, 1), layer(x)) <= 1e-5


def test_params_carry_logical_axes():
    layer = TTTLayer(TTTConfig(d_model=16, num_heads=2), rngs=nnx.Rngs(0))
    params = nnx.state(layer, nnx.Param)
    for name, var in params.items():
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var[...].ndim, name
    assert layer.W_qk.get_metadata()["out_sharding"] == ("embed", "qkv")
    assert layer.W1.get_metadata()["out_sharding"] == ("heads", None, None)


def test_bf16_compute_fp32_params_and_state():
    config = TTTConfig(d_model=16, num_heads=2, mini_batch_size=4, precision=BF16)
    layer = TTTLayer(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 16))
    y, cache = layer.decode(x, layer.init_cache(1))
    assert y.dtype == jnp.bfloat16
    assert layer.W1[...].dtype == jnp.float32
    assert cache.state.W1.dtype == jnp.float32


def test_remat_knobs_do_not_change_gradients():
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 24, 16))

    def grads(**kw):
        layer = TTTLayer(
            TTTConfig(d_model=16, num_heads=2, mini_batch_size=4, **kw), rngs=nnx.Rngs(0)
        )
        graphdef, params = nnx.split(layer, nnx.Param)
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)

    ref = jax.tree.leaves(grads(checkpoint_group=None, unroll=1))
    for kw in [
        dict(checkpoint_group=2, unroll=1),
        dict(checkpoint_group=4, remat_policy="dots", unroll=1),
    ]:
        for a, b in zip(jax.tree.leaves(grads(**kw)), ref, strict=True):
            assert rel_err(a, b) <= 1e-6


def test_default_knobs_match_plain_autodiff_to_rounding():
    """The defaults (checkpoint_group=4, unroll=4): unrolling reorders fp32 sums. The leaves
    that are sums with heavy cancellation (lr_b, token_offset: norm ~1e-5 against ~1e-1 for the
    rest) then move by ~1e-10 absolute, ~5e-6 of their own norm; the whole gradient by 3e-7."""
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 24, 16))

    def grads(**kw):
        layer = TTTLayer(
            TTTConfig(d_model=16, num_heads=2, mini_batch_size=4, **kw), rngs=nnx.Rngs(0)
        )
        graphdef, params = nnx.split(layer, nnx.Param)
        g = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)
        return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(g)])

    assert rel_err(grads(), grads(checkpoint_group=None, unroll=1)) <= 1e-6


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(d_model=30, num_heads=4), "TTTConfig.d_model=30 is not divisible by num_heads=4"),
        (dict(d_model=12, num_heads=4), "head_dim=3 must be even"),
        (dict(d_model=16, num_heads=2, inner="gru"), "TTTConfig.inner='gru' is not one of"),
        (dict(d_model=16, num_heads=2, backbone="rnn"), "TTTConfig.backbone='rnn' is not one of"),
        (
            dict(d_model=16, num_heads=2, mini_batch_size=0),
            "TTTConfig.mini_batch_size must be a positive int",
        ),
        (
            dict(d_model=16, num_heads=2, checkpoint_group=None, remat_policy="dots"),
            "needs checkpoint_group",
        ),
        (dict(d_model=16, num_heads=2, base_lr=0.0), "TTTConfig.base_lr=0.0 must be > 0"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TTTConfig(**kwargs)


@pytest.mark.parametrize("dtype", [jnp.int8, "floaty"])
def test_mixed_precision_names_a_non_float_dtype(dtype):
    with pytest.raises(ValueError, match="MixedPrecision.compute_dtype must be a float dtype"):
        MixedPrecision(compute_dtype=dtype)


def test_named_classes_check_inner():
    TTTLinear(TTTConfig(d_model=16, num_heads=2), rngs=nnx.Rngs(0))
    TTTMLP(TTTConfig(d_model=16, num_heads=2, inner="mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="TTTMLP needs TTTConfig.inner='mlp'"):
        TTTMLP(TTTConfig(d_model=16, num_heads=2), rngs=nnx.Rngs(0))


def test_bad_input_shape():
    layer = TTTLayer(TTTConfig(d_model=16, num_heads=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x has shape \(1, 8, 12\) but expected \(B, T, 16\)"):
        layer(jnp.zeros((1, 8, 12)))
