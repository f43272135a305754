"""Named remat policies end to end (issue 6, SPEC 4): unknown names list the valid ones, every
policy gives the gradients of no remat for a TTT layer and for a model block, and
`offload_names:` is opt-in with gradients equal to the non-offloaded path's.

What jax 0.10.2 does with `offload_names:` on the CPU: the policy marks the tagged residuals
offloadable and the jaxpr moves them with `device_put` to `jax.memory.Space.Host` (and back in
the backward), but the CPU lowering of `device_put` is the identity (jax registers the
memory-kind lowering for GPU and TPU only), so the compiled program keeps them in ordinary
memory. The CPU tests therefore run the real offload code path up to the lowering and compare
real gradients; the `gpu` test checks that the compiled program really holds host buffers.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tests.memory_helpers import equations, init, run_fast, small_model
from ttt_jax.layers import MixedPrecision, TTTConfig, TTTLayer
from ttt_jax.memory import Remat
from ttt_jax.memory.model_workload import next_token_loss
from ttt_jax.models import LM, ModelConfig
from ttt_jax.ops.core.remat import POLICY_NAMES, resolve_policy
from ttt_jax.testing import LAYER_TOL, OP_TOL, rel_err

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")

LAYER_POLICIES = [
    "none",
    "full",
    "dots",
    "dots_no_batch",
    "save_names:ttt_grad,ttt_z",
    "offload_names:ttt_grad,ttt_z_bar",
]
BLOCK_POLICIES = [
    "full",
    "dots",
    "dots_no_batch",
    "save_names:mixer_out,mid_residual",
    "offload_names:mixer_out,mid_residual",
]
# 5 complete mini-batches and a partial one; groups of 2 leave a shorter last group.
LAYER = TTTConfig(d_model=32, num_heads=2, mini_batch_size=4, checkpoint_group=None, unroll=1)
T = 23
F64 = MixedPrecision(jnp.float64, jnp.float64, jnp.float64)


def host_transfers(jaxpr) -> int:
    """How many `device_put`s to host memory a jaxpr holds (the offload policy's moves)."""
    return sum(
        jax.memory.Space.Host in eqn.params["devices"]
        for eqn in equations(jaxpr)
        if eqn.primitive.name == "device_put"
    )


@functools.cache
def values(config):
    """Initial parameters, shared by every remat setting of the same shapes."""
    build = LM if isinstance(config, ModelConfig) else TTTLayer
    return init(lambda: build(config, rngs=nnx.Rngs(0)))[1]


def layer_grad_fn(config: TTTConfig):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: TTTLayer(config, rngs=nnx.Rngs(0))))
    params = values(LAYER)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, T, config.d_model))

    def loss(params, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

    return jax.grad(loss, argnums=(0, 1)), (params, x)


_LAYER_GRADS: dict = {}


def layer_grads(group, policy):
    if (group, policy) not in _LAYER_GRADS:
        config = dataclasses.replace(LAYER, checkpoint_group=group, remat_policy=policy)
        fn, args = layer_grad_fn(config)
        _LAYER_GRADS[(group, policy)] = run_fast(fn, *args)
    return _LAYER_GRADS[(group, policy)]


def assert_same(grads, ref, tol):
    errs = jax.tree.leaves(jax.tree.map(rel_err, grads, ref))
    assert errs and max(errs) <= tol, max(errs)


@pytest.mark.parametrize("bad", ["fancy", "dot", "offload:ttt_grad", "save_names"])
def test_unknown_policy_lists_the_valid_ones(bad):
    valid = ("none", "full", "dots", "dots_no_batch", "save_names:", "offload_names:")
    for make in (
        lambda: resolve_policy(bad),
        lambda: TTTConfig(d_model=8, num_heads=2, checkpoint_group=2, remat_policy=bad),
        lambda: ModelConfig(block_remat=bad),
        lambda: Remat(block_remat=bad),
    ):
        with pytest.raises(ValueError, match="valid: ") as err:
            make()
        assert bad in str(err.value)
        assert all(v in str(err.value) for v in valid), str(err.value)
    assert len(POLICY_NAMES) == len(valid)


def test_offload_is_opt_in():
    for policy in ("full", "dots", "save_names:ttt_grad"):
        fn, args = layer_grad_fn(
            dataclasses.replace(LAYER, checkpoint_group=2, remat_policy=policy)
        )
        assert host_transfers(jax.make_jaxpr(fn)(*args)) == 0, policy
    fn, args = layer_grad_fn(
        dataclasses.replace(LAYER, checkpoint_group=1, remat_policy="offload_names:ttt_grad")
    )
    assert host_transfers(jax.make_jaxpr(fn)(*args)) > 0


@pytest.mark.parametrize("policy", LAYER_POLICIES)
def test_every_policy_gives_the_layer_gradients_of_no_remat(policy):
    # Offloading takes groups of one chunk (below); every other policy runs groups of two.
    group = 1 if policy.startswith("offload_names:") else 2
    assert_same(layer_grads(group, policy), layer_grads(None, None), LAYER_TOL)


def test_offload_with_groups_of_more_than_one_chunk_is_rejected_before_tracing():
    # XLA cannot offload the residuals of the nested scan that groups of G > 1 use (on an H200,
    # jax 0.11.2, compiling fails; benchmarks/RESULTS.md), so the knob check refuses it.
    with pytest.raises(ValueError, match="checkpoint_group=1") as err:
        TTTLayer(
            dataclasses.replace(LAYER, checkpoint_group=2, remat_policy="offload_names:ttt_grad"),
            rngs=nnx.Rngs(0),
        )
    assert "checkpoint_group=2" in str(err.value)


def test_offload_gradients_equal_the_saved_path():
    fn, args = layer_grad_fn(
        dataclasses.replace(LAYER, checkpoint_group=1, remat_policy="offload_names:ttt_grad,ttt_z")
    )
    # The offload path really runs: the tagged residuals go to host memory space in the jaxpr.
    assert host_transfers(jax.make_jaxpr(fn)(*args)) > 0
    offloaded = layer_grads(1, "offload_names:ttt_grad,ttt_z")
    assert_same(offloaded, layer_grads(1, "save_names:ttt_grad,ttt_z"), OP_TOL)


def model_grad_fn(config: ModelConfig):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0))))
    params = values(config)  # remat does not change the initial parameters
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 24), 0, config.vocab_size)

    def loss(params, tokens):
        return next_token_loss(nnx.merge(graphdef, params), tokens)

    return jax.grad(loss), (params, tokens)


_MODEL_GRADS: dict = {}


def model_grads(block_remat):
    if block_remat not in _MODEL_GRADS:
        fn, args = model_grad_fn(small_model(block_remat=block_remat, checkpoint_group=2))
        _MODEL_GRADS[block_remat] = run_fast(fn, *args)
    return _MODEL_GRADS[block_remat]


@pytest.mark.parametrize("policy", BLOCK_POLICIES)
def test_every_block_policy_gives_the_model_gradients_of_no_block_remat(policy):
    if policy.startswith("offload_names:"):
        fn, args = model_grad_fn(small_model(block_remat=policy, checkpoint_group=2))
        assert host_transfers(jax.make_jaxpr(fn)(*args)) > 0
    assert_same(model_grads(policy), model_grads("none"), LAYER_TOL)


def test_fp64_model_block_remat_is_exact():
    # precision="fp64" computes every norm, gate and nonlinearity of the blocks in float64 (they
    # were pinned to fp32 before), so two remat policies agree to float64 rounding. TTT blocks
    # only: jax.nn.dot_product_attention keeps its softmax in fp32 whatever the input dtype.
    with jax.enable_x64(True):
        wide = dict(num_layers=4, checkpoint_group=2, precision="fp64")
        grads = []
        for policy in ("dots", "none"):
            config = small_model(block_remat=policy, pattern=("ttt_linear/swiglu",), **wide)
            fn, args = model_grad_fn(config)
            grads.append(jax.jit(fn)(*args))
        assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads[0]))
        assert_same(*grads, 1e-12)


def compiled_text(fn, args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.gpu
@on_gpu
def test_offload_on_gpu_uses_host_memory_and_keeps_gradients():
    offload = dataclasses.replace(
        LAYER, checkpoint_group=1, remat_policy="offload_names:ttt_grad,ttt_z"
    )
    fn, args = layer_grad_fn(offload)
    # S(5) is XLA's host memory space: the offloaded residuals live in pinned host memory.
    assert "S(5)" in compiled_text(fn, args)
    assert "S(5)" not in compiled_text(
        *layer_grad_fn(dataclasses.replace(offload, remat_policy="save_names:ttt_grad,ttt_z"))
    )
    # The gradients are compared in float64: the offloading and the saving programs fuse
    # differently, and in fp32 the inner steps amplify that rounding to the edge of a fixed
    # bound (H100, jax 0.11.2: 1.24e-5 on one leaf against OP_TOL 1e-5), a platform margin. In
    # float64 the rounding is ~1e-16, so OP_TOL then says that offloading changes no value.
    with jax.enable_x64(True):
        grads = []
        for policy in ("offload_names:ttt_grad,ttt_z", "save_names:ttt_grad,ttt_z"):
            wide = dataclasses.replace(offload, remat_policy=policy, precision=F64)
            graphdef, params = init(lambda wide=wide: TTTLayer(wide, rngs=nnx.Rngs(0)))
            x = jax.random.normal(jax.random.PRNGKey(1), (2, T, LAYER.d_model), jnp.float64)

            def loss(params, x, graphdef=graphdef):
                return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

            grads.append(jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x))
        assert_same(*grads, OP_TOL)
    # Two layer groups: with one (num_layers == len(pattern)) XLA removes the trip-count-1 layer
    # loop and the host offload with it (H100 probe: no S(5) with one group, 42 buffers with
    # two; benchmarks/results/block_offload_probe_h100_2026-12-07.log).
    two_groups = dict(num_layers=4, checkpoint_group=2)
    block_fn, block_args = model_grad_fn(
        small_model(block_remat="offload_names:mixer_out,mid_residual", **two_groups)
    )
    assert "S(5)" in compiled_text(block_fn, block_args)
    # The gradients again in float64 (H100, jax 0.11.2: 1.17e-4 against LAYER_TOL 1e-4 in fp32,
    # the same platform margin as above), on TTT blocks only: `jax.nn.dot_product_attention`
    # computes its softmax in fp32 whatever the input dtype, so attention is not float64.
    with jax.enable_x64(True):
        wide = dict(two_groups, precision="fp64", pattern=("ttt_linear/swiglu",))
        grads = [
            jax.jit(fn)(*args)
            for fn, args in (
                model_grad_fn(small_model(block_remat=policy, **wide))
                for policy in ("offload_names:mixer_out,mid_residual", "none")
            )
        ]
        assert_same(*grads, OP_TOL)
