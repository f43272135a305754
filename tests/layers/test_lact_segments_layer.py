"""LaCT layer with packed documents (issue 18): `layer(x, segment_ids)` gives every document the
outputs and gradients it gets alone: the window attention masks other documents' keys, RoPE
positions start at 0 at each document, the fast weight restarts (the op's `segment_ids`).
Documents of 5, 11 and 3 tokens at chunk 4, window 5: a short first document, one with two
chunks and a tail, a short last one; windows that would reach across documents."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.memory_helpers import run_fast
from ttt_jax.layers import LaCTConfig, LaCTLayer, MixedPrecision
from ttt_jax.testing import OP_TOL, rel_err

TINY = LaCTConfig(
    d_model=16, num_heads=2, num_fw_heads=2, fw_hidden=6, window=5, chunk_size=4, rank=3
)
LENS = (5, 11, 3)


def make_layer(config=TINY, seed=0):
    """A layer with every parameter perturbed (norms, offsets and rate biases included)."""
    layer = LaCTLayer(config, rngs=nnx.Rngs(seed))
    params = nnx.state(layer, nnx.Param)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(jax.tree.leaves(params))))
    nnx.update(
        layer, jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), params)
    )
    return layer


def value_and_grads(layer, x, ids, probe):
    """`sum(y * probe)` and its gradients w.r.t. the parameters and x."""
    graphdef, params = nnx.split(layer, nnx.Param)

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x, ids)
        return jnp.sum(y * probe), y

    fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, y), (g_params, g_x) = run_fast(fn, params, x)
    return y, g_params, g_x


def test_packed_row_equals_documents_alone():
    check_packed(TINY, jnp.float32, OP_TOL)


def test_packed_row_equals_documents_alone_muon_float64():
    """Muon in float64: Newton-Schulz amplifies fp32 rounding ~1e3 (in fp32 the packed and the
    alone runs, which round differently, measured 6e-5 apart in dx), so the comparison runs in
    float64 at the op tolerance. What is left (measured 2.5e-9 to 1.5e-8 in dx, with or
    without Muon; outputs to 1e-14) is `jax.nn.dot_product_attention`, which takes its softmax
    in fp32 whatever the input dtype."""
    f64 = MixedPrecision(jnp.float64, jnp.float64, jnp.float64)
    with jax.enable_x64(True):
        check_packed(dataclasses.replace(TINY, use_muon=True, precision=f64), jnp.float64, OP_TOL)


def check_packed(config, dtype, tol):
    layer = make_layer(config)
    t = sum(LENS)
    x = jax.random.normal(jax.random.PRNGKey(7), (1, t, 16), dtype)
    probe = jax.random.normal(jax.random.PRNGKey(8), (1, t, 16), dtype)
    ids = jnp.asarray(np.repeat(np.arange(len(LENS)), LENS)[None], jnp.int32)
    y, g_params, g_x = value_and_grads(layer, x, ids, probe)
    starts = np.cumsum([0, *LENS[:-1]])
    g_sum = None
    for s, n in zip(starts, LENS, strict=True):
        sl = slice(s, s + n)
        y_a, g_a, gx_a = value_and_grads(layer, x[:, sl], None, probe[:, sl])
        assert rel_err(y[:, sl], y_a) <= tol, (s, rel_err(y[:, sl], y_a))
        assert rel_err(g_x[:, sl], gx_a) <= tol, (s, rel_err(g_x[:, sl], gx_a))
        g_sum = g_a if g_sum is None else jax.tree.map(jnp.add, g_sum, g_a)
    flat, want = jax.tree_util.tree_flatten_with_path(g_params)[0], jax.tree.leaves(g_sum)
    for (path, g), w in zip(flat, want, strict=True):
        assert rel_err(g, w) <= tol, (jax.tree_util.keystr(path), rel_err(g, w))
    # Without the ids the documents interact (the comparison above measures something).
    y_one, _, _ = value_and_grads(layer, x, None, probe)
    assert rel_err(y_one[:, LENS[0] :], y[:, LENS[0] :]) > 1e-3


def test_decode_and_bad_segment_ids_are_value_errors():
    layer = make_layer()
    x = jnp.ones((2, 6, 16))
    ids = jnp.zeros((2, 6), jnp.int32)
    with pytest.raises(ValueError, match="LaCTLayer.decode streams one document"):
        layer.decode(x, None, ids)
    with pytest.raises(ValueError, match="segment_ids must have an integer dtype"):
        layer(x, ids.astype(jnp.float32))
    with pytest.raises(ValueError, match="segment_ids"):
        layer(x, ids[:, :-1])
