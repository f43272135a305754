"""The TTT layer's `impl` choice: the Pallas kernel (interpreted on the CPU) inside the layer
gives the XLA layer's outputs and parameter gradients; "auto" is the XLA scan off the GPU and
with `segment_ids`; a bad choice is a ValueError at config time."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ttt_jax.layers import BF16, TTTConfig, TTTLayer
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
    with pytest.raises(ValueError, match="segment_ids"):
        outputs_and_grads(dataclasses.replace(CONFIG, impl="pallas_interpret"), x, seg)


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
