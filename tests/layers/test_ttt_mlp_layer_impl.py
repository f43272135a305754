"""The TTT-MLP layer passes `TTTConfig.impl` to the op: the Pallas kernel (interpreted on the CPU)
inside the layer gives the XLA layer's outputs and parameter gradients (the kernel's manual
backward against autodiff of the XLA scan); "auto" is the XLA scan off the GPU; on a GPU it is
the kernel, within the bf16 tolerance of the XLA layer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers import BF16, TTTConfig, TTTLayer
from ttt_jax.layers.common import MixedPrecision
from ttt_jax.testing import GPU_BF16_TOL, OP_TOL, rel_err

# D = 16 (hidden 64) and mini-batch 16: the kernel's smallest shape; T = 40 ends mid-mini-batch.
CONFIG = TTTConfig(d_model=32, num_heads=2, inner="mlp", mini_batch_size=16, checkpoint_group=2)
F64 = MixedPrecision(jnp.float64, jnp.float64, jnp.float64)


def outputs_and_grads(config: TTTConfig, x, params=None):
    """The layer's outputs and the gradients of `sum(sin(y))` w.r.t. its parameters (`params`:
    values to use instead of the layer's own initial ones)."""
    layer = TTTLayer(config, rngs=nnx.Rngs(0))
    graphdef, own = nnx.split(layer)

    def loss(params):
        y = nnx.merge(graphdef, params)(x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(own if params is None else params)
    return y, g, own


def assert_close(a, b, tol):
    (ya, ga, _), (yb, gb, _) = a, b
    assert rel_err(ya.astype(jnp.float32), yb.astype(jnp.float32)) <= tol
    for (path, u), w in zip(
        jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb), strict=True
    ):
        assert rel_err(u, w) <= tol, (jax.tree_util.keystr(path), rel_err(u, w))


def test_mlp_kernel_in_the_layer_equals_the_xla_layer():
    """Kernel and XLA layers in fp32, each against the XLA layer in float64 on the same values.

    The reference is float64 because one gradient is ill-conditioned in fp32: `token_offset`'s
    (a sum over tokens, heads and mini-batches with cancellation) is 1.4e-5 off float64 in the
    fp32 XLA layer itself (measured, CPU) and 3.1e-5 in the kernel; every other leaf and the
    output are <= 1e-6 off in both. So each leaf of the kernel must be within 1e-5 of float64
    or, where fp32 rounding alone exceeds that, within 4x the fp32 XLA layer's own error: a
    wrong term in the backward shows up as errors of 1e-2 and more (as on the op's tests).
    """
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 40, 32))
    xla = outputs_and_grads(dataclasses.replace(CONFIG, impl="xla"), x)
    kernel = outputs_and_grads(
        dataclasses.replace(CONFIG, impl="pallas_interpret", kernel_checkpoint_group=2), x
    )
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda a: np.asarray(a, np.float64), xla[2])
        exact = outputs_and_grads(
            dataclasses.replace(CONFIG, impl="xla", precision=F64), np.asarray(x, np.float64), wide
        )
    assert rel_err(kernel[0], exact[0]) <= OP_TOL
    for (path, k), r, e in zip(
        jax.tree_util.tree_leaves_with_path(kernel[1]),
        jax.tree.leaves(xla[1]),
        jax.tree.leaves(exact[1]),
        strict=True,
    ):
        floor = rel_err(r, e)  # the fp32 XLA layer's own rounding
        assert rel_err(k, e) <= max(OP_TOL, 4 * floor), (jax.tree_util.keystr(path), floor)
    if jax.default_backend() != "gpu":
        auto = jax.make_jaxpr(lambda: outputs_and_grads(CONFIG, x))()
        assert "pallas_call" not in str(auto)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_auto_mlp_layer_takes_the_kernel_on_gpu_in_bf16():
    config = TTTConfig(d_model=256, num_heads=4, inner="mlp", mini_batch_size=16, precision=BF16)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 200, 256))
    auto = outputs_and_grads(config, x)
    xla = outputs_and_grads(dataclasses.replace(config, impl="xla"), x)
    assert not bool(jnp.all(auto[0] == xla[0]))  # a different program ran: the kernel
    assert_close(auto, xla, GPU_BF16_TOL)
