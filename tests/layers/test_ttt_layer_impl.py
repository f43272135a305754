"""The TTT layer's `impl` choice: the Pallas kernel (interpreted on the CPU) inside the layer
gives the XLA layer's outputs and parameter gradients, with and without `segment_ids`; "auto" is
the XLA scan off the GPU and with `segment_ids`; a bad choice is a ValueError at config time."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers import BF16, TTTConfig, TTTLayer
from ttt_jax.layers.common import MixedPrecision
from ttt_jax.testing import GPU_BF16_TOL, OP_TOL, rel_err

# D = 16 and mini-batch 16: the kernel's smallest supported shape; T = 40 ends mid-mini-batch.
CONFIG = TTTConfig(d_model=32, num_heads=2, mini_batch_size=16, checkpoint_group=2)


def outputs_and_grads(config: TTTConfig, x, segment_ids=None):
    layer = TTTLayer(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    def loss(params):
        y = nnx.merge(graphdef, params)(x, segment_ids)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return y, g


def assert_close(a, b, tol):
    ya, ga = a
    yb, gb = b
    assert rel_err(ya, yb) <= tol
    for u, w in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        assert rel_err(u, w) <= tol


def test_kernel_in_the_layer_equals_the_xla_layer():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 40, 32))
    xla = outputs_and_grads(dataclasses.replace(CONFIG, impl="xla"), x)
    kernel = outputs_and_grads(
        dataclasses.replace(CONFIG, impl="pallas_interpret", kernel_checkpoint_group=2), x
    )
    assert_close(kernel, xla, OP_TOL)
    # "auto" off the GPU is the XLA scan, bit for bit.
    if jax.default_backend() != "gpu":
        auto = outputs_and_grads(CONFIG, x)
        assert bool(jnp.all(auto[0] == xla[0]))


def test_auto_with_segment_ids_runs_the_xla_scan():
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 40, 32))
    seg = jnp.array([[0] * 13 + [1] * 27])
    auto = outputs_and_grads(dataclasses.replace(CONFIG, impl="auto"), x, seg)
    xla = outputs_and_grads(dataclasses.replace(CONFIG, impl="xla"), x, seg)
    assert bool(jnp.all(auto[0] == xla[0]))
    # The kernel takes packed documents when asked for ("pallas"; here interpreted). The lr_b
    # gradient is a sum over tokens that cancels (here ~1e-3 against per-token terms ~1e-2;
    # both fp32 layers sit 7e-6 and 1e-5 from the float64 layer): it is held to the bound of
    # `lr_b_bound` instead of OP_TOL against the fp32 XLA layer.
    kernel = outputs_and_grads(dataclasses.replace(CONFIG, impl="pallas_interpret"), x, seg)
    assert rel_err(kernel[0], xla[0]) <= OP_TOL
    for (path, u), w in zip(
        jax.tree_util.tree_flatten_with_path(kernel[1])[0], jax.tree.leaves(xla[1]), strict=True
    ):
        if "lr_b" not in jax.tree_util.keystr(path):
            assert rel_err(u, w) <= OP_TOL, jax.tree_util.keystr(path)
    err, bound = lr_b_bound(kernel[1]["lr_b"][...], x, seg)
    assert np.all(err <= bound), (err, bound)


def lr_b_bound(grad, x, seg):
    """`(|grad - g|, OP_TOL * sum_t |c_t|)` per head, where `c[b, t, h]` is token (b, t)'s
    contribution to the float64 XLA layer's lr_b gradient `g = sum c` (the cotangent of its
    logit). If each token's contribution is right to OP_TOL relative, the sum is off by at
    most OP_TOL times the sum of their magnitudes, however much they cancel."""
    with jax.enable_x64(True):
        f64 = jnp.float64
        config = dataclasses.replace(CONFIG, impl="xla", precision=MixedPrecision.named("fp64"))
        graphdef = nnx.split(TTTLayer(config, rngs=nnx.Rngs(0)))[0]
        params = nnx.split(TTTLayer(CONFIG, rngs=nnx.Rngs(0)))[1]  # the fp32 layers' values
        params = jax.tree.map(lambda a: a.astype(f64), params)

        def loss(delta):
            # lr_b + delta as a per-token bias [B, T, H]: the layer adds lr_b to its logits
            # [B, T, H] by broadcasting, so a full-shape value is taken as it is.
            p = jax.tree.map(lambda a: a, params)
            p["lr_b"].set_value(p["lr_b"].get_value() + delta)
            return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x.astype(f64), seg)))

        c = np.asarray(jax.grad(loss)(jnp.zeros((*x.shape[:2], CONFIG.num_heads), f64)))
    g = c.sum((0, 1))
    return np.abs(np.asarray(grad, np.float64) - g), OP_TOL * np.abs(c).sum((0, 1))


def test_bad_impl_is_a_value_error():
    with pytest.raises(ValueError, match="TTTConfig.impl"):
        TTTConfig(d_model=32, num_heads=2, impl="triton")
    with pytest.raises(ValueError, match="TTTConfig.kernel_checkpoint_group"):
        TTTConfig(d_model=32, num_heads=2, kernel_checkpoint_group=0)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_auto_layer_takes_the_kernel_on_gpu_in_bf16():
    config = TTTConfig(d_model=256, num_heads=4, mini_batch_size=16, precision=BF16)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 200, 256))
    auto = outputs_and_grads(config, x)
    xla = outputs_and_grads(dataclasses.replace(config, impl="xla"), x)
    assert not bool(jnp.all(auto[0] == xla[0]))  # a different program ran: the kernel
    assert_close(auto, xla, GPU_BF16_TOL)
