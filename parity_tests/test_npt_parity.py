"""NPT: JAX ops, `NPTMLP` and `NPTBlock` vs the torch reference (SPEC 3.4, 5).

Ops: outputs and gradients with respect to every input (fp32 CPU, <= 1e-5). Layers: outputs,
the auxiliary loss, and gradients with respect to the inputs and every parameter (<= 1e-4), for
the low-rank and rank-k modulations (both rank-k forms), and both block variants (attention
output in the residual stream or only modulating the MLP).
"""

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx

import ttt_torch_ref
from parity_tests.convert import (
    jax_param_names,
    npt_block_to_torch,
    npt_mlp_to_torch,
    to_numpy,
    to_torch,
)
from ttt_jax.layers import NPTMLP, NPTBlock, NPTBlockConfig, NPTMLPConfig
from ttt_jax.ops import npt_generated_rank_k_linear, npt_modulated_linear, npt_rank_k_linear
from ttt_jax.testing import GPU_BF16_TOL, LAYER_TOL, OP_TOL, rel_err


def op_inputs(kind, b, s, d, f, r, seed):
    """The op's positional and keyword inputs, all random."""
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    n = lambda *shape: jax.random.normal(next(ks), shape) / 2  # noqa: E731
    h = n(b, s, d)
    if kind == "low_rank":
        return {"h": h, "m": n(b, s, r)}, {"W": n(d, f), "A": n(d, r), "B": n(r, f)}
    if kind == "rank_k":
        return {"h": h, "u": n(b, s, r, d), "w": n(b, s, r, f)}, {"W": n(d, f)}
    k = r + 1
    return {"h": h, "g": n(b, s, r)}, {"W": n(d, f), "W_u": n(r, k, d), "W_w": n(r, k, f)}


JAX_OPS = {
    "low_rank": npt_modulated_linear,
    "rank_k": npt_rank_k_linear,
    "generated": npt_generated_rank_k_linear,
}
ORDER = {"low_rank": ("h", "m"), "rank_k": ("h", "u", "w"), "generated": ("h", "g")}
TORCH_OPS = {
    "low_rank": ttt_torch_ref.npt_modulated_linear_materialised,
    "rank_k": ttt_torch_ref.npt_rank_k_linear_materialised,
    "generated": ttt_torch_ref.npt_generated_rank_k_linear,
}


@pytest.mark.parametrize("kind", ["low_rank", "rank_k", "generated"])
@pytest.mark.parametrize("b,s,d,f,r", [(2, 7, 8, 12, 3), (1, 16, 5, 9, 1)])
def test_op_parity(kind, b, s, d, f, r):
    args, kw = op_inputs(kind, b, s, d, f, r, seed=s + d)
    probe = jax.random.normal(jax.random.PRNGKey(s), (b, s, f))

    @jax.jit
    def objective(args, kw):
        y = JAX_OPS[kind](*(args[n] for n in ORDER[kind]), **kw)
        return jnp.sum(y * probe), y

    (_, y), (ga, gk) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(args, kw)

    ta = {n: to_torch(v, requires_grad=True) for n, v in args.items()}
    tk = {n: to_torch(v, requires_grad=True) for n, v in kw.items()}
    ty = TORCH_OPS[kind](*ta.values(), **tk)
    grads = torch.autograd.grad((ty * to_torch(probe)).sum(), [*ta.values(), *tk.values()])

    assert rel_err(y, to_numpy(ty)) <= OP_TOL
    jax_grads = [*(ga[n] for n in ta), *(gk[n] for n in tk)]  # jax sorts dict keys
    for name, gj, gt in zip([*ta, *tk], jax_grads, grads, strict=True):
        assert rel_err(gj, to_numpy(gt)) <= OP_TOL, (name, rel_err(gj, to_numpy(gt)))


# --- layers ---------------------------------------------------------------------------------


def randomise(module, seed, std=0.3):
    """Every parameter random and O(std), so the modulation matters as much as the dense path."""
    params = nnx.state(module, nnx.Param)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(params))))
    nnx.update(
        module, jax.tree.map(lambda p: p + std * jax.random.normal(next(keys), p.shape), params)
    )
    return module


def check_layer(module, ref, inputs, t_inputs, probe):
    """Output, aux loss, and gradients of <probe, y> + 3 aux w.r.t. inputs and every parameter."""
    graphdef, params = nnx.split(module, nnx.Param)

    @jax.jit
    def objective(params, inputs):
        y, aux = nnx.merge(graphdef, params)(*inputs)
        return jnp.sum(y * probe) + 3.0 * aux, (y, aux)

    (_, (y, aux)), (gp, gi) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        params, inputs
    )
    ty, taux = ref(*t_inputs)
    obj = (ty * to_torch(probe)).sum() + 3.0 * taux
    names = [n for n, _ in ref.named_parameters()]
    grads = torch.autograd.grad(obj, [*t_inputs, *ref.parameters()])

    assert rel_err(y, to_numpy(ty)) <= LAYER_TOL
    assert rel_err(aux, to_numpy(taux)) <= LAYER_TOL
    for i, (gj, gt) in enumerate(zip(gi, grads[: len(t_inputs)], strict=True)):
        assert rel_err(gj, to_numpy(gt)) <= LAYER_TOL, (f"input {i}", rel_err(gj, to_numpy(gt)))
    gp = jax_param_names(nnx.merge(graphdef, gp))
    for name, gt in zip(names, grads[len(t_inputs) :], strict=True):
        assert rel_err(gp[name], to_numpy(gt)) <= LAYER_TOL, (name, rel_err(gp[name], to_numpy(gt)))


MLP_CASES = [
    # modulation, rank_k_form, rank, k, reg_lambda, d_mod
    ("low_rank", "factored", 3, 1, 0.0, None),
    ("low_rank", "factored", 4, 1, 0.5, 5),
    ("rank_k", "factored", 3, 2, 0.0, None),
    ("rank_k", "factored", 2, 3, 0.5, 5),
    ("rank_k", "vectors", 3, 2, 0.5, None),
    ("none", "factored", 3, 1, 0.0, None),
]


@pytest.mark.parametrize("modulation,form,rank,k,reg,d_mod", MLP_CASES)
def test_mlp_parity(modulation, form, rank, k, reg, d_mod):
    config = NPTMLPConfig(
        d_model=8,
        d_ff=12,
        d_mod=d_mod,
        modulation=modulation,
        rank=rank,
        k=k,
        rank_k_form=form,
        mod_scale=0.7,
        reg_lambda=reg,
    )
    layer = randomise(NPTMLP(config, rngs=nnx.Rngs(rank + k)), seed=rank * k)
    ref = npt_mlp_to_torch(layer)
    kx, ka, kr = jax.random.split(jax.random.PRNGKey(k), 3)
    x = jax.random.normal(kx, (2, 9, 8))
    a = jax.random.normal(ka, (2, 9, config.mod_width))
    probe = jax.random.normal(kr, (2, 9, 8))
    if modulation == "none":
        check_layer(layer, ref, (x,), (to_torch(x, requires_grad=True),), probe)
    else:
        t_inputs = (to_torch(x, requires_grad=True), to_torch(a, requires_grad=True))
        check_layer(layer, ref, (x, a), t_inputs, probe)


@pytest.mark.parametrize("attn_residual", [True, False])
@pytest.mark.parametrize("modulation", ["low_rank", "rank_k"])
def test_block_parity(attn_residual, modulation):
    mlp = NPTMLPConfig(
        d_model=8, d_ff=12, modulation=modulation, rank=3, k=2, mod_scale=0.7, reg_lambda=0.25
    )
    config = NPTBlockConfig(num_heads=2, head_dim=4, mlp=mlp, attn_residual=attn_residual)
    block = randomise(NPTBlock(config, rngs=nnx.Rngs(0)), seed=1 + attn_residual)
    ref = npt_block_to_torch(block)
    kx, kr = jax.random.split(jax.random.PRNGKey(2))
    x = jax.random.normal(kx, (2, 11, 8))
    probe = jax.random.normal(kr, (2, 11, 8))
    check_layer(block, ref, (x,), (to_torch(x, requires_grad=True),), probe)


# --- bf16 on a GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["low_rank", "rank_k", "generated"])
def test_op_parity_bf16_gpu(kind):
    args, kw = op_inputs(kind, 2, 64, 64, 128, 8, seed=0)
    y = JAX_OPS[kind](*(v.astype(jnp.bfloat16) for v in args.values()), **kw)
    assert y.dtype == jnp.bfloat16
    with torch.no_grad():
        ty = TORCH_OPS[kind](
            *(to_torch(v) for v in args.values()), **{n: to_torch(v) for n, v in kw.items()}
        )
    assert rel_err(y.astype(jnp.float32), to_numpy(ty)) <= GPU_BF16_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("attn_residual", [True, False])
@pytest.mark.parametrize("modulation", ["low_rank", "rank_k"])
def test_block_parity_bf16_gpu(attn_residual, modulation):
    from ttt_jax.layers import BF16

    mlp = NPTMLPConfig(
        d_model=64, d_ff=128, modulation=modulation, rank=8, k=2, mod_scale=0.7, precision=BF16
    )
    config = NPTBlockConfig(num_heads=4, head_dim=16, mlp=mlp, attn_residual=attn_residual)
    block = randomise(NPTBlock(config, rngs=nnx.Rngs(0)), seed=1, std=0.05)
    ref = npt_block_to_torch(block)
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 64, 64))
    y, _ = block(x)
    with torch.no_grad():
        ty, _ = ref(to_torch(x))
    assert rel_err(y.astype(jnp.float32), to_numpy(ty)) <= GPU_BF16_TOL
