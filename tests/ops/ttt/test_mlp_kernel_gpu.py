"""TTT-MLP's Pallas kernels compiled for the GPU (what the CPU interpreter cannot reach: the
Triton compilation, bf16 tensor-core MMAs, the CTA barriers of the backward's scratch and of the
"hbm" state layout).

Every kernel output starts as NaN (`poison=True`), so an element the kernel fails to write fails
the comparison. bf16 q, k, v: the kernel's outputs and final state against the fp32 XLA op on the
same bf16-valued inputs (and, at short T, the fp32 torch reference: it loops over tokens), and
its gradients against the fp32 XLA op, `<= 2e-2` (SPEC 5); fp32 inputs: the kernel equals the
XLA op to `<= 1e-5`. Each layout knob (`Launch`) that the benchmark may pick is run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ttt_torch_ref
from ttt_jax.ops import ttt_mlp
from ttt_jax.ops.ttt.mlp_kernel import Launch, ttt_mlp_pallas
from ttt_jax.testing import GPU_BF16_TOL, OP_TOL, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
]

SLOW = ("W1", "b1", "W2", "b2")
LAUNCHES = {
    "default": (None, None),
    "hbm": (Launch(hidden_block=64, state_in="hbm"), Launch(hidden_block=64, state_in="hbm")),
    "registers": (Launch(), Launch()),
}


def inputs(b, t, h, d, seed, dtype):
    f = 4 * d
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 12))
    n = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape)  # noqa: E731
    x = [n((b, t, h, d)).astype(dtype) for _ in range(3)]
    eta = 0.2 * jax.nn.sigmoid(n((b, t, h)))
    p = dict(
        W1=n((h, d, f), d**-0.5),
        b1=n((h, f), 0.1),
        W2=n((h, f, d), f**-0.5),
        b2=n((h, d), 0.1),
        ln_scale=1 + n((h, d), 0.1),
        ln_bias=n((h, d), 0.1),
        token_scale=1.0 / jnp.arange(1, 17, dtype=jnp.float32) + n((16,), 0.05),
    )
    return (*x, eta), p


def kernel_fn(launches=(None, None), poison=True):
    def run(q, k, v, eta, p):
        b = q.shape[0]
        state = tuple(jnp.broadcast_to(p[s], (b, *p[s].shape)) for s in SLOW)
        return ttt_mlp_pallas(
            q, k, v, eta, state, p["ln_scale"], p["ln_bias"], p["token_scale"],
            mini_batch_size=16, checkpoint_group=4, interpret=False, fwd=launches[0],
            bwd=launches[1], poison=poison,
        )  # fmt: skip

    return run


def xla_fn(q, k, v, eta, p):
    o, s = ttt_mlp(q, k, v, eta, **p, mini_batch_size=16, checkpoint_group=4)
    return o, s.W1, s.b1, s.W2, s.b2


def grads(fn, args, probes):
    def objective(*a):
        return sum(jnp.sum(x.astype(jnp.float32) * r) for x, r in zip(fn(*a), probes, strict=True))

    return jax.jit(jax.grad(objective, argnums=(0, 1, 2, 3, 4)))(*args)


def probes_for(shapes, seed=11):
    ks = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return tuple(jax.random.normal(k, s.shape) for k, s in zip(ks, shapes, strict=True))


@pytest.mark.parametrize(
    "t,layout",
    [(80, "default"), (80, "hbm"), (80, "registers"), (8192, "default"), (8200, "default")],
)
def test_kernel_bf16_vs_torch_reference_and_xla(t, layout):
    (q, k, v, eta), p = inputs(2, t, 2, 64, seed=t, dtype=jnp.bfloat16)
    got = jax.jit(kernel_fn(LAUNCHES[layout]))(q, k, v, eta, p)
    o = got[0]
    assert o.dtype == jnp.bfloat16 and all(s.dtype == jnp.float32 for s in got[1:])
    assert bool(jnp.isfinite(o.astype(jnp.float32)).all())

    # The fp32 XLA op on the same bf16 values: the reference for outputs and gradients.
    args32 = (q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), eta, p)
    want = jax.jit(xla_fn)(*args32)
    if t <= 128:  # the primal-form torch reference loops over tokens: short T only
        to_t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
        with torch.no_grad():
            to, ts = ttt_torch_ref.ttt_mlp(
                *(to_t(a) for a in args32[:4]),
                **{n: to_t(p[n]) for n in (*SLOW, "ln_scale", "ln_bias", "token_scale")},
                mini_batch_size=16,
            )
        assert rel_err(o.astype(jnp.float32), to.numpy()) <= GPU_BF16_TOL
        for name, a in zip(SLOW, got[1:], strict=True):
            assert rel_err(a, getattr(ts, name).numpy()) <= GPU_BF16_TOL, name
    for name, a, r in zip(("o", *SLOW), got, want, strict=True):
        assert rel_err(a.astype(jnp.float32), r) <= GPU_BF16_TOL, (name, rel_err(a, r))

    probes = probes_for(want)
    g = grads(kernel_fn(LAUNCHES[layout]), (q, k, v, eta, p), probes)
    g_ref = grads(xla_fn, args32, probes)
    for name, a, r in zip(("q", "k", "v", "eta"), g[:4], g_ref[:4], strict=True):
        assert bool(jnp.isfinite(a.astype(jnp.float32)).all()), name
        assert rel_err(a.astype(jnp.float32), r) <= GPU_BF16_TOL, (name, rel_err(a, r))
    for name in p:
        assert rel_err(g[4][name], g_ref[4][name]) <= GPU_BF16_TOL, name


@pytest.mark.parametrize("d,layout", [(32, "default"), (64, "default"), (64, "hbm")])
def test_kernel_fp32_equals_xla_op_on_gpu(d, layout):
    args = inputs(2, 72, 3, d, seed=d, dtype=jnp.float32)
    args = (*args[0], args[1])
    launches = LAUNCHES[layout]
    got = jax.jit(kernel_fn(launches))(*args)
    want = jax.jit(xla_fn)(*args)
    for a, r in zip(got, want, strict=True):
        assert rel_err(a, r) <= OP_TOL
    probes = probes_for(want)
    g = grads(kernel_fn(launches), args, probes)
    g_ref = grads(xla_fn, args, probes)
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert rel_err(a, r) <= OP_TOL


def test_impl_pallas_and_auto_take_the_kernel():
    (q, k, v, eta), p = inputs(1, 48, 2, 64, seed=3, dtype=jnp.bfloat16)
    want = kernel_fn(poison=False)(q, k, v, eta, p)
    for impl in ("pallas", "auto"):
        o, s = ttt_mlp(q, k, v, eta, **p, mini_batch_size=16, checkpoint_group=4, impl=impl)
        np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(want[0], np.float32))
        np.testing.assert_array_equal(np.asarray(s.W2), np.asarray(want[3]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_with_segments_vs_xla_op(dtype):
    """Packed documents on the GPU kernels (`impl="pallas"`, default launches: at D=64 the
    forward's state in registers, the backward's in HBM) against the fp32 XLA op's packed path
    on the same values: fp32 `<= 1e-5`, bf16 `<= 2e-2` (outputs, state, gradients)."""
    t = 200
    (q, k, v, eta), p = inputs(2, t, 2, 64, seed=9, dtype=dtype)
    lengths = ((40, 5, 100, 55), (16, 16, 168))
    seg = jnp.asarray(np.stack([np.repeat(np.arange(len(r)), r) for r in lengths]), jnp.int32)

    def fn(impl):
        def run(q, k, v, eta, p):
            o, s = ttt_mlp(
                q, k, v, eta, **p, mini_batch_size=16, checkpoint_group=4, segment_ids=seg,
                impl=impl,
            )  # fmt: skip
            return o, s.W1, s.b1, s.W2, s.b2

        return run

    args32 = (q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), eta, p)
    got = jax.jit(fn("pallas"))(q, k, v, eta, p)
    want = jax.jit(fn("xla"))(*args32)
    tol = OP_TOL if dtype == jnp.float32 else GPU_BF16_TOL
    for a, r in zip(got, want, strict=True):
        assert rel_err(a.astype(jnp.float32), r) <= tol
    probes = probes_for(want)
    g = grads(fn("pallas"), (q, k, v, eta, p), probes)
    g_ref = grads(fn("xla"), args32, probes)
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert rel_err(a.astype(jnp.float32), r) <= tol
