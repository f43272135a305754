"""TTT layers: JAX `TTTLayer` vs the torch `TTTLayerRef`, parameters copied by `convert`.

Outputs and gradients w.r.t. the input and every parameter, fp32 CPU, relative error <= 1e-4.
"""

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx

from parity_tests.convert import to_numpy, to_torch, ttt_layer_to_torch
from ttt_jax.layers import TTTConfig, TTTLayer
from ttt_jax.testing import GPU_BF16_TOL, LAYER_TOL, rel_err


def perturbed_layer(config, seed):
    """A layer whose every parameter is random (biases, norms, offsets included)."""
    layer = TTTLayer(config, rngs=nnx.Rngs(seed))
    params = nnx.state(layer, nnx.Param)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(jax.tree.leaves(params))))
    noisy = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params)
    nnx.update(layer, noisy)
    return layer


@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
@pytest.mark.parametrize("inner,t,group", [("linear", 19, None), ("linear", 24, 2), ("mlp", 19, 2)])
def test_layer_parity(backbone, inner, t, group):
    config = TTTConfig(
        d_model=16,
        num_heads=2,
        inner=inner,
        mini_batch_size=8,
        backbone=backbone,
        checkpoint_group=group,
    )
    layer = perturbed_layer(config, seed=t)
    ref = ttt_layer_to_torch(layer)
    x = jax.random.normal(jax.random.PRNGKey(7), (2, t, 16))
    r = jax.random.normal(jax.random.PRNGKey(8), (2, t, 16))

    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def objective(params, x):
        y = nnx.merge(graphdef, params)(x)
        return jnp.sum(y * r), y

    (_, y), (gp, gx) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(params, x)

    tx = to_torch(x, requires_grad=True)
    ty, _ = ref(tx)
    names = [n for n, _ in ref.named_parameters()]
    grads = torch.autograd.grad((ty * to_torch(r)).sum(), [tx, *ref.parameters()])

    assert rel_err(y, to_numpy(ty)) <= LAYER_TOL
    assert rel_err(gx, to_numpy(grads[0])) <= LAYER_TOL
    for name, g in zip(names, grads[1:], strict=True):
        assert rel_err(gp[name][...], to_numpy(g)) <= LAYER_TOL, name


@pytest.mark.gpu
@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_layer_parity_bf16_gpu(inner):
    from ttt_jax.layers import BF16

    config = TTTConfig(d_model=64, num_heads=4, inner=inner, mini_batch_size=16, precision=BF16)
    layer = perturbed_layer(config, seed=1)
    ref = ttt_layer_to_torch(layer)
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 64, 64))
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    with torch.no_grad():
        ty, _ = ref(to_torch(x))
    assert rel_err(y.astype(jnp.float32), to_numpy(ty)) <= GPU_BF16_TOL
