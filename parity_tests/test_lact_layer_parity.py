"""LaCT layer: JAX `LaCTLayer` vs the torch `LaCTLayerRef`, parameters copied by `convert`.

Outputs, the final fast-weight state, and gradients with respect to the input, every parameter
and (when a call starts from one) every field of the initial state; relative error <= 1e-4
(LAYER_TOL), with and without momentum, Muon, weight norm and the low-rank start.

Cases without Muon run in fp32 on CPU. Cases with Muon run in float64 on both sides (layer
parameters, compute and state dtypes, torch module and inputs): Newton-Schulz amplifies the
rounding of its input ~1e3x (see `test_lact_parity.py`), so two correct fp32 implementations
disagree there by more than the tolerance. Part of the JAX layer stays fp32 inside even then
(`jax.nn.dot_product_attention`'s softmax), which is why those cases agree to 3-4e-8 rather
than ~1e-13 (measured; 1.5-6e-6 while RoPE also computed in fp32); well inside the tolerance.

The reference's `initial_state` continues only the fast weights (its attention starts fresh
and its positions at 0); the JAX cache carrying the same is `init_cache(B)` with `ttt` replaced.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from parity_tests.convert import lact_layer_to_torch, lact_state_to_torch, to_numpy, to_torch
from ttt_jax.layers import BF16, LaCTConfig, LaCTLayer, MixedPrecision
from ttt_jax.ops.lact.op import LaCTState
from ttt_jax.testing import GPU_BF16_TOL, LAYER_TOL, rel_err

B, d = 2, 16
FIELDS = ("w0", "w1", "w2", "m0", "m1", "m2")


def config(**kw):
    base = dict(d_model=d, num_heads=2, num_fw_heads=2, fw_hidden=6, window=5, chunk_size=4, rank=3)
    return LaCTConfig(**{**base, **kw})


def perturbed_layer(cfg, seed):
    """A layer whose every parameter is random (norm scales, offsets and rate biases too)."""
    layer = LaCTLayer(cfg, rngs=nnx.Rngs(seed))
    params = nnx.state(layer, nnx.Param)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(jax.tree.leaves(params))))
    noisy = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape, p.dtype), params
    )
    nnx.update(layer, noisy)
    return layer


def random_state(cfg, seed, dtype):
    """A fast-weight state to start from: `[B, H, ...]`, momentum buffers included."""
    h, fd, hid = cfg.num_fw_heads, cfg.fw_head_dim, cfg.fw_hidden_dim
    shapes = {"w0": (hid, fd), "w1": (fd, hid), "w2": (hid, fd)}
    shapes |= {f"m{j}": shapes[f"w{j}"] for j in range(3)}
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 6))
    return LaCTState(
        **{f: 0.5 * jax.random.normal(next(keys), (B, h, *shapes[f]), dtype) for f in FIELDS}
    )


CASES = {
    # name: (config overrides, T, start from a state)
    "momentum-lowrank-scale": (dict(learnable_scale=True), 11, False),
    "plain-dense-no-wn-autodiff": (
        dict(
            use_momentum=False,
            weight_norm=False,
            rank=None,
            backward="autodiff",
            checkpoint_group=2,
        ),
        12,
        False,
    ),
    "momentum-from-state": (dict(checkpoint_group=2), 9, True),
    "muon-momentum-lowrank": (dict(use_muon=True, learnable_scale=True), 11, False),
    "muon-dense-no-wn-from-state": (
        dict(use_muon=True, use_momentum=False, weight_norm=False, rank=None),
        10,
        True,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_layer_parity(name):
    overrides, t, with_state = CASES[name]
    muon = overrides.get("use_muon", False)
    context = jax.enable_x64(True) if muon else contextlib.nullcontext()
    with context:
        check_layer_parity(overrides, t, with_state, jnp.float64 if muon else jnp.float32)


def check_layer_parity(overrides, t, with_state, dtype):
    cfg = config(precision=MixedPrecision(dtype, dtype, dtype), **overrides)
    layer = perturbed_layer(cfg, seed=t)
    ref = lact_layer_to_torch(layer, torch.float64 if dtype == jnp.float64 else torch.float32)
    x = jax.random.normal(jax.random.PRNGKey(7), (B, t, d), dtype)
    r = jax.random.normal(jax.random.PRNGKey(8), (B, t, d), dtype)
    r_state = random_state(cfg, seed=9, dtype=dtype)
    state0 = random_state(cfg, seed=10, dtype=dtype) if with_state else None

    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def objective(params, x, state0):
        module = nnx.merge(graphdef, params)
        cache = None if state0 is None else module.init_cache(B).replace(ttt=state0)
        y, cache = module.decode(x, cache)
        probe = sum(jnp.sum(getattr(cache.ttt, f) * getattr(r_state, f)) for f in FIELDS)
        return jnp.sum(y * r) + probe, (y, cache.ttt)

    (_, (y, s)), (gp, gx, gs) = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(
        params, x, state0
    )

    tx = to_torch(x, requires_grad=True)
    ts0 = lact_state_to_torch(state0, requires_grad=True) if with_state else None
    ty, ts = ref(tx, initial_state=ts0)
    obj = (ty * to_torch(r)).sum() + sum(
        (getattr(ts, f) * to_torch(getattr(r_state, f))).sum() for f in FIELDS
    )
    names = [n for n, _ in ref.named_parameters()]
    leaves = [tx, *ref.parameters()] + ([getattr(ts0, f) for f in FIELDS] if ts0 else [])
    grads = torch.autograd.grad(obj, leaves, allow_unused=True)

    assert y.dtype == s.w0.dtype == dtype and to_numpy(ty).dtype == dtype
    assert rel_err(y, to_numpy(ty)) <= LAYER_TOL
    for f in FIELDS:
        want = to_numpy(getattr(ts, f))
        if not np.any(want):  # momentum buffers without momentum: zeros on both sides
            assert not cfg.use_momentum and f[0] == "m" and not np.any(getattr(s, f)), f
            continue
        assert rel_err(getattr(s, f), want) <= LAYER_TOL, (f, rel_err(getattr(s, f), want))

    jax_grads = {"x": gx, **{n: gp[n][...] for n in names}}
    if with_state:
        jax_grads |= {f"initial_state.{f}": getattr(gs, f) for f in FIELDS}
    torch_names = ["x", *names] + ([f"initial_state.{f}" for f in FIELDS] if with_state else [])
    assert set(jax_grads) == set(torch_names)
    for name, gt in zip(torch_names, grads, strict=True):
        gj = np.asarray(jax_grads[name]).reshape(-1)
        if gt is None:
            # What cannot reach the result: the start weights when a state starts the call and
            # no weight norm reads them; the initial momentum without momentum.
            assert not np.any(gj), name
            continue
        gt = to_numpy(gt).reshape(-1)
        assert rel_err(gj, gt) <= LAYER_TOL, (name, rel_err(gj, gt))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(use_muon=True, learnable_scale=True),
        dict(use_muon=True, learnable_scale=True, muon_dtype="float32"),
    ],
)
def test_layer_parity_bf16_gpu(overrides):
    cfg = config(
        d_model=64,
        num_heads=4,
        num_fw_heads=2,
        fw_hidden=32,
        window=16,
        chunk_size=16,
        rank=8,
        precision=BF16,
        **overrides,
    )
    layer = perturbed_layer(cfg, seed=1)
    ref = lact_layer_to_torch(layer)
    x = jax.random.normal(jax.random.PRNGKey(7), (B, 64, 64))
    graphdef, state = nnx.split(layer)
    y, cache = jax.jit(lambda s, x: nnx.merge(graphdef, s).decode(x))(state, x)
    assert y.dtype == jnp.bfloat16 and cache.ttt.w0.dtype == jnp.float32
    # Not under torch.no_grad(): the reference's inner autograd.grad then fails on the views
    # of its parameters (ttt_torch_ref.lact.inner_gradients), so it runs with grad on.
    ty, ts = ref(to_torch(x))
    assert rel_err(y.astype(jnp.float32), to_numpy(ty)) <= GPU_BF16_TOL
    for f in ("w0", "w1", "w2"):
        assert rel_err(getattr(cache.ttt, f), to_numpy(getattr(ts, f))) <= GPU_BF16_TOL, f
