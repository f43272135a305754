"""The TTT-MLP layer passes `TTTConfig.impl` (and `kernel_checkpoint_group`) to the op: the
Pallas kernel (interpreted on the CPU) inside the layer gives the XLA layer's outputs; "auto" is
the XLA scan everywhere (the TTT-MLP kernel is opt-in until it is timed on a GPU); on a GPU
`impl="pallas"` is within the bf16 tolerance of the XLA layer (outputs and parameter gradients).

The kernel's gradients are compared with autodiff's at the op (`tests/ops/ttt/test_mlp_kernel.py`);
through the whole layer in fp32 one of them, `token_offset`'s, is ill-conditioned (a sum with
cancellation: the fp32 XLA layer is itself 1.4e-5 off the float64 layer, the kernel 3.1e-5,
measured on the CPU), so the CPU test here checks the outputs and which program runs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ttt_jax.layers import BF16, TTTConfig, TTTLayer
from ttt_jax.testing import GPU_BF16_TOL, OP_TOL, rel_err

# D = 16 (hidden 64) and mini-batch 16: the kernel's smallest shape; T = 40 ends mid-mini-batch.
CONFIG = TTTConfig(d_model=32, num_heads=2, inner="mlp", mini_batch_size=16, checkpoint_group=2)


def forward(config: TTTConfig):
    graphdef, params = nnx.split(TTTLayer(config, rngs=nnx.Rngs(0)))
    return lambda x: nnx.merge(graphdef, params)(x)


def outputs_and_grads(config: TTTConfig, x):
    layer = TTTLayer(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    def loss(params):
        y = nnx.merge(graphdef, params)(x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return y, g


def assert_close(a, b, tol):
    (ya, ga), (yb, gb) = a, b
    assert rel_err(ya.astype(jnp.float32), yb.astype(jnp.float32)) <= tol
    for (path, u), w in zip(
        jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb), strict=True
    ):
        assert rel_err(u, w) <= tol, (jax.tree_util.keystr(path), rel_err(u, w))


def test_mlp_kernel_in_the_layer_equals_the_xla_layer():
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 40, 32))
    kernel_cfg = dataclasses.replace(CONFIG, impl="pallas_interpret", kernel_checkpoint_group=2)
    jaxpr = str(jax.make_jaxpr(forward(kernel_cfg))(x))
    assert jaxpr.count("pallas_call") == 1
    xla = jax.jit(forward(dataclasses.replace(CONFIG, impl="xla")))(x)
    kernel = jax.jit(forward(kernel_cfg))(x)
    assert rel_err(kernel, xla) <= OP_TOL
    assert "pallas_call" not in str(jax.make_jaxpr(forward(CONFIG))(x))  # "auto": XLA


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_pallas_mlp_layer_on_gpu_in_bf16_and_auto_stays_on_xla():
    config = TTTConfig(d_model=256, num_heads=4, inner="mlp", mini_batch_size=16, precision=BF16)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 200, 256))
    kernel = outputs_and_grads(dataclasses.replace(config, impl="pallas"), x)
    xla = outputs_and_grads(dataclasses.replace(config, impl="xla"), x)
    assert not bool(jnp.all(kernel[0] == xla[0]))  # a different program ran: the kernel
    assert_close(kernel, xla, GPU_BF16_TOL)
    # "auto" keeps TTT-MLP on the XLA scan until its kernel is timed (TTTConfig.impl).
    assert "pallas_call" not in str(jax.make_jaxpr(forward(config))(x))
