"""LaCT layer: shapes and dtypes, streaming, low-rank vs dense starts, knobs, config errors and
the 760M preset's parameter count. Tiny shapes; every layer call is compiled with the fast CPU
options (`memory_helpers.run_fast`: compiling is most of a test's time). The file takes about a
minute on 2 cores."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.memory_helpers import run_fast
from ttt_jax.layers import BF16, LaCTCache, LaCTConfig, LaCTLayer, MixedPrecision
from ttt_jax.layers.lact import PRESETS
from ttt_jax.testing import GPU_BF16_TOL, rel_err

# d=16, 2 attention heads of 8, 2 fast-weight heads of D=8 with Dh=6, chunk 4, window 5.
TINY = LaCTConfig(
    d_model=16, num_heads=2, num_fw_heads=2, fw_hidden=6, window=5, chunk_size=4, rank=3
)


def make_layer(config=TINY, seed=0):
    """A layer with every parameter perturbed (norms, offsets and rate biases included)."""
    layer = LaCTLayer(config, rngs=nnx.Rngs(seed))
    params = nnx.state(layer, nnx.Param)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(jax.tree.leaves(params))))
    nnx.update(
        layer, jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), params)
    )
    return layer


def jitted(layer):
    """`layer.decode(x, cache)`, compiled (`run_fast`; also where XLA's optimised CPU build rejects a
    bf16 x bf16 -> fp32 dot of the op)."""
    graphdef, state = nnx.split(layer)
    return lambda x, cache: run_fast(
        lambda s, x, c: nnx.merge(graphdef, s).decode(x, c), state, x, cache
    )


def inputs(t, b=2, d=16, seed=7):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, t, d))


def test_shapes_and_cache_fp32():
    layer = make_layer()
    y, cache = jitted(layer)(inputs(11), None)
    assert y.shape == (2, 11, 16) and y.dtype == jnp.float32
    assert cache.ttt.w0.shape == (2, 2, 6, 8) and cache.ttt.w1.shape == (2, 2, 8, 6)
    assert cache.q.shape == (2, 11 % 4, 2, 8)  # the unfinished third chunk
    assert cache.lr.shape == (2, 3, 3, 2) and cache.beta.shape == (2, 3, 2)
    assert cache.attn_k.shape == (2, 4, 2, 8)  # window - 1 keys
    assert int(cache.position) == 11
    assert bool(jnp.all(jnp.isfinite(y)))


def test_bf16_compute_keeps_fp32_params_and_state():
    layer = make_layer(dataclasses.replace(TINY, precision=BF16, use_muon=True))
    y, cache = jitted(layer)(inputs(10), None)
    assert y.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert all(getattr(cache.ttt, f).dtype == jnp.float32 for f in ("w0", "w1", "w2", "m0"))
    assert cache.q.dtype == jnp.bfloat16 and cache.lr.dtype == jnp.float32
    y32, cache32 = jitted(make_layer(dataclasses.replace(TINY, use_muon=True)))(inputs(10), None)
    # bf16 rounding of the same layer (SPEC 5's bf16 tolerance), not a different one.
    assert rel_err(y.astype(jnp.float32), y32) <= GPU_BF16_TOL
    assert rel_err(cache.ttt.w0, cache32.ttt.w0) <= GPU_BF16_TOL


# Muon's case runs in float64 (parameters, compute, state and input): Newton-Schulz amplifies the
# rounding of its input ~1e3x, so in fp32 the pieces and the whole call (the same math, rounded
# in another order) differed by 0.8e-5 here and 1.3e-5 on another machine, against the 1e-5
# bound: a margin set by the platform. In float64 they agree to 1.2e-15 (state; output 3e-16)
# under the same bound.
F64 = MixedPrecision(jnp.float64, jnp.float64, jnp.float64)


@pytest.mark.parametrize(
    "overrides,cuts",
    [
        (dict(), [8]),  # a chunk boundary: the op's own streaming property
        # mid-chunk, inside the window
        (dict(use_muon=True, learnable_scale=True, precision=F64), [3, 9, 10]),
        (dict(use_momentum=False, weight_norm=False, rank=None), [1, 6]),
    ],
)
def test_pieces_equal_one_call(overrides, cuts):
    wide = overrides.get("precision") is F64
    with jax.enable_x64(wide):
        check_pieces_equal_one_call(overrides, cuts, jnp.float64 if wide else jnp.float32)


def check_pieces_equal_one_call(overrides, cuts, dtype):
    layer = make_layer(dataclasses.replace(TINY, **overrides))
    run, x = jitted(layer), inputs(14)
    y, whole = run(x, None)
    assert y.dtype == whole.ttt.w0.dtype == dtype
    cache, outs = layer.init_cache(2), []
    for a, b in zip([0, *cuts], [*cuts, 14], strict=True):
        y_p, cache = run(x[:, a:b], cache)
        outs.append(y_p)
    assert rel_err(jnp.concatenate(outs, 1), y) <= 1e-5
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(whole), strict=True):
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-5 if np.any(want) else not np.any(got)


def test_causal():
    layer = make_layer(dataclasses.replace(TINY, use_muon=True))
    run, x = jitted(layer), inputs(12)
    y, _ = run(x, None)
    y2, _ = run(x.at[:, 6:].add(1.0), None)
    np.testing.assert_array_equal(y[:, :6], y2[:, :6])
    assert not np.allclose(y[:, 6:], y2[:, 6:])


def test_low_rank_start_and_dense_twin_gradients():
    """The dense twin holds `w0 = left @ right + 0.5 I` (and w2) as plain parameters: the same
    outputs, and the low-rank factors' gradients are the chain rule of the dense ones."""
    cfg = dataclasses.replace(TINY, learnable_scale=True)
    low = make_layer(cfg)
    w0, _, w2 = low.slow_weights()
    eye = 0.5 * jnp.eye(6, 8)
    np.testing.assert_allclose(w0, low.w0_left[...] @ low.w0_right[...] + eye, atol=1e-6)
    dense = LaCTLayer(dataclasses.replace(cfg, rank=None), rngs=nnx.Rngs(0))
    shared = [n for n in nnx.state(low, nnx.Param) if not n.startswith(("w0", "w2"))]
    for name in shared:
        getattr(dense, name)[...] = getattr(low, name)[...]
    dense.w0[...], dense.w2[...] = w0, w2
    x, r = inputs(10), inputs(10, seed=8)

    def grads(layer):
        graphdef, params = nnx.split(layer, nnx.Param)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x) * r)  # noqa: E731
        return run_fast(jax.value_and_grad(loss), params)

    (v_low, g_low), (v_dense, g_dense) = grads(low), grads(dense)
    assert v_low == pytest.approx(float(v_dense), rel=1e-6)
    for j in (0, 2):
        left, right = getattr(low, f"w{j}_left")[...], getattr(low, f"w{j}_right")[...]
        g = g_dense[f"w{j}"][...]
        assert rel_err(g_low[f"w{j}_left"][...], g @ jnp.swapaxes(right, 1, 2)) <= 1e-5
        assert rel_err(g_low[f"w{j}_right"][...], jnp.swapaxes(left, 1, 2) @ g) <= 1e-5
    for name in shared:
        assert rel_err(g_low[name][...], g_dense[name][...]) <= 1e-5, name
        assert np.any(g_low[name][...]), name  # every parameter gets a gradient


def test_memory_knobs_do_not_change_gradients():
    """Without Muon: in fp32 its Newton-Schulz steps amplify the rounding differences of two
    equal computations ~1e3x (the op tests compare the knobs with Muon)."""
    x = inputs(13)

    def grads(**kw):
        layer = make_layer(dataclasses.replace(TINY, **kw))
        graphdef, params = nnx.split(layer, nnx.Param)
        g = run_fast(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)), params)
        return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(g)])

    ref = grads(backward="autodiff")
    assert rel_err(grads(), ref) <= 1e-5
    assert rel_err(grads(backward="custom", checkpoint_group=2), ref) <= 1e-5
    assert rel_err(grads(backward="autodiff", checkpoint_group=1, remat_policy="dots"), ref) <= 1e-5


def test_rates_start_at_base_lr_and_axes():
    layer = LaCTLayer(TINY, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(jax.nn.softplus(layer.b_lr[...]), 1e-3, rtol=1e-5)
    for name, var in nnx.state(layer, nnx.Param).items():
        assert len(var.get_metadata()["out_sharding"]) == var[...].ndim, name
    assert layer.w0_left.get_metadata()["out_sharding"] == ("heads", None, "rank")
    assert isinstance(layer.init_cache(1), LaCTCache)


def analytic_param_count(d, n_fw, dh, r, momentum, scale):
    """Counted from SPEC 3.2's layer: qkv and output projections, per-channel scale and offset
    of q, k, v, three rate heads with biases, momentum and scale heads, the low-rank w0 and w2,
    dense w1, and the per-head RMSNorm scale."""
    D = d // n_fw
    return (
        3 * d * d
        + d * d
        + 2 * 3 * d
        + 3 * d * n_fw
        + 3 * n_fw
        + (d * n_fw if momentum else 0)
        + (d * n_fw if scale else 0)
        + 2 * n_fw * (dh * r + r * D)
        + n_fw * D * dh
        + n_fw * D
    )


def test_760m_preset_shape_and_param_count():
    cfg = LaCTConfig.preset("760m")
    assert (cfg.d_model, cfg.num_heads, cfg.num_fw_heads, cfg.fw_head_dim) == (1536, 24, 4, 384)
    assert (cfg.chunk_size, cfg.window, cfg.rank, cfg.fw_hidden_dim) == (2048, 2048, 32, 384)
    layer = nnx.eval_shape(lambda: LaCTLayer(cfg, rngs=nnx.Rngs(0)))
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert count == analytic_param_count(1536, 4, 384, 32, momentum=True, scale=True)
    assert count == 10_265_100  # 9.44M of it the qkv and output projections
    assert LaCTConfig.preset("760m", use_muon=False).use_muon is False
    assert set(PRESETS) == {"tiny", "760m"}


def field_error(field, value, message, **base):
    return (
        dict(base or dict(d_model=16, num_heads=2, num_fw_heads=2, rank=4), **{field: value}),
        message,
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        field_error("d_model", 0, "LaCTConfig.d_model must be a positive int, got 0"),
        field_error("num_heads", 3, "LaCTConfig.num_heads=3 must divide d_model=16 into even"),
        field_error("num_fw_heads", 16, "LaCTConfig.num_fw_heads=16 must divide d_model=16"),
        field_error("chunk_size", 0, "LaCTConfig.chunk_size must be a positive int, got 0"),
        field_error("window", 2.0, "LaCTConfig.window must be a positive int, got 2.0"),
        field_error("rank", 9, r"LaCTConfig.rank=9 must be <= min\(fw_hidden, d_model / num_fw"),
        field_error("fw_hidden", 0, "LaCTConfig.fw_hidden must be a positive int, got 0"),
        field_error("base_lr", 0.0, "LaCTConfig.base_lr must be a finite number > 0, got 0.0"),
        field_error("norm_eps", math.nan, "LaCTConfig.norm_eps must be a finite number > 0"),
        field_error("use_muon", 1, "LaCTConfig.use_muon must be a bool, got 1"),
        field_error("muon_dtype", "fp16", "LaCTConfig.muon_dtype='fp16' is not one of"),
        field_error("backward", "manual", "LaCTConfig.backward='manual' is not one of"),
        field_error("attention_impl", "flash", "LaCTConfig.attention_impl='flash' is not one of"),
        field_error("precision", "bf16", "LaCTConfig.precision must be a MixedPrecision"),
        field_error("remat_policy", "dots", "remat_policy='dots' needs checkpoint_group"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LaCTConfig(**kwargs)


def test_bad_input_and_preset_names():
    layer = LaCTLayer(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x has shape \(1, 8, 12\) but expected \(B, T, 16\)"):
        layer(jnp.zeros((1, 8, 12)))
    with pytest.raises(ValueError, match="LaCTConfig preset='1b' is not one of"):
        LaCTConfig.preset("1b")
