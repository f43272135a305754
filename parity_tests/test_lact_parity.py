"""LaCT: JAX `lact_swiglu` vs the independent torch reference (SPEC 3.2, 5).

Outputs, final states (weights and momentum buffers), and gradients with respect to q, k, v,
the three rates, the momentum, w0 / w1 / w2 and every field of the initial state, with and
without momentum, Muon and weight norm, both backwards; relative error <= 1e-5 (OP_TOL).

Cases without Muon run in fp32 on CPU. Cases with Muon run in float64 on both sides (inputs,
`state_dtype` and every matmul, which accumulates in fp64 for fp64 operands): the quintic
Newton-Schulz iteration pushes every singular value of the update towards 1, so it amplifies
the rounding of its input by ~1e3 (small singular values are scaled up the most). Two correct
fp32 implementations that round differently then disagree by ~1e-4 relative after a few
chunks, whereas in float64 the op agrees with the reference to ~1e-13. The tolerance is the
same; only the arithmetic is wide enough to show the agreement.
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ttt_torch_ref
from parity_tests.convert import lact_state_to_torch, to_numpy, to_torch
from ttt_jax.ops.lact.op import LaCTState, lact_swiglu
from ttt_jax.testing import GPU_BF16_TOL, OP_TOL, rel_err

B, H, D, DH = 2, 2, 4, 6
FIELDS = ("w0", "w1", "w2", "m0", "m1", "m2")


def make_inputs(t, seed, with_state, dtype=jnp.float32):
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    n = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape, dtype)  # noqa: E731
    x = {
        "q": n((B, t, H, D)),
        "k": n((B, t, H, D)),
        "v": n((B, t, H, D)),
        **{f"lr{j}": 0.2 * jax.nn.sigmoid(n((B, t, H))) for j in range(3)},
        "momentum": jax.nn.sigmoid(n((B, t, H))),
    }
    w = {"w0": n((H, DH, D), 0.5), "w1": n((H, D, DH), 0.5), "w2": n((H, DH, D), 0.5)}
    state = None
    if with_state:
        state = LaCTState(
            **{f: w[f][None] + n((B, *w[f].shape), 0.1) for f in ("w0", "w1", "w2")},
            **{f"m{j}": n((B, *w[f"w{j}"].shape), 0.1) for j in range(3)},
        )
    return x, w, state


CASES = [
    # T, C, momentum, muon, weight_norm, initial state, backward, checkpoint_group
    (16, 4, False, False, True, False, "custom", None),
    (18, 4, True, False, True, True, "custom", None),
    (15, 4, True, True, True, True, "custom", 2),
    (13, 3, False, True, False, False, "custom", None),
    (14, 4, True, False, False, True, "autodiff", None),
    (17, 4, True, True, True, False, "autodiff", 2),
    (3, 4, True, True, True, True, "custom", None),  # shorter than one chunk
]


def wide_if(muon: bool):
    """float64 for Muon cases (module docstring), fp32 otherwise: `(context, dtype)`."""
    if muon:
        return jax.enable_x64(True), jnp.float64
    return contextlib.nullcontext(), jnp.float32


@pytest.mark.parametrize("t,c,mom,muon,wn,with_state,backward,group", CASES)
def test_op_parity(t, c, mom, muon, wn, with_state, backward, group):
    context, dtype = wide_if(muon)
    with context:
        check_op_parity(t, c, mom, muon, wn, with_state, backward, group, dtype)


def check_op_parity(t, c, mom, muon, wn, with_state, backward, group, dtype):
    x, w, state0 = make_inputs(t, seed=t + c, with_state=with_state, dtype=dtype)
    if not mom:
        del x["momentum"]

    def run(x, w, state0):
        return lact_swiglu(
            *(x[n] for n in ("q", "k", "v", "lr0", "lr1", "lr2")),
            **w,
            chunk_size=c,
            momentum=x.get("momentum"),
            use_muon=muon,
            weight_norm=wn,
            initial_state=state0,
            backward=backward,
            checkpoint_group=group,
            state_dtype=dtype,
        )

    # Random cotangents so every output and state element enters the gradient.
    keys = iter(jax.random.split(jax.random.PRNGKey(t + 100), 8))
    r_out = jax.random.normal(next(keys), (B, t, H, D), dtype)
    shapes = {"w0": (DH, D), "w1": (D, DH), "w2": (DH, D)}
    r_state = {f: jax.random.normal(next(keys), (B, H, *shapes[f"w{f[1]}"]), dtype) for f in FIELDS}

    @jax.jit
    def objective(x, w, state0):
        o, s = run(x, w, state0)
        probe = sum(jnp.sum(getattr(s, f) * r_state[f]) for f in FIELDS)
        return jnp.sum(o * r_out) + probe, (o, s)

    (_, (o, s)), (gx, gw, gs) = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(
        x, w, state0
    )

    tx = {n: to_torch(v, requires_grad=True) for n, v in x.items()}
    tw = {n: to_torch(v, requires_grad=True) for n, v in w.items()}
    ts0 = lact_state_to_torch(state0, requires_grad=True) if with_state else None
    to, tstate = ttt_torch_ref.lact_swiglu(
        *(tx[n] for n in ("q", "k", "v", "lr0", "lr1", "lr2")),
        **tw,
        chunk_size=c,
        momentum=tx.get("momentum"),
        use_muon=muon,
        weight_norm=wn,
        initial_state=ts0,
    )
    obj = (to * to_torch(r_out)).sum() + sum(
        (getattr(tstate, f) * to_torch(r_state[f])).sum() for f in FIELDS
    )
    leaves = [*tx.values(), *tw.values()] + ([getattr(ts0, f) for f in FIELDS] if ts0 else [])
    grads = torch.autograd.grad(obj, leaves, allow_unused=True)

    assert o.dtype == s.w0.dtype == dtype and to_numpy(to).dtype == dtype
    assert rel_err(o, to_numpy(to)) <= OP_TOL
    for f in FIELDS:
        want = to_numpy(getattr(tstate, f))
        if not np.any(want):  # momentum buffers without momentum: zeros on both sides
            assert not mom and f[0] == "m" and not np.any(np.asarray(getattr(s, f))), f
            continue
        assert rel_err(getattr(s, f), want) <= OP_TOL, (f, rel_err(getattr(s, f), want))

    names = [*tx, *tw] + ([f"initial_state.{f}" for f in FIELDS] if with_state else [])
    jax_grads = [*(gx[n] for n in tx), *(gw[n] for n in tw)]
    if with_state:
        jax_grads += [getattr(gs, f) for f in FIELDS]
    # Inputs that cannot reach the result: the slow weights when a state starts the call and
    # no weight norm reads them; the initial momentum without momentum (with momentum it is
    # at least the final state's, unchanged, when no chunk completes); everything the update
    # reads when no chunk completes.
    unused = set()
    if with_state and (not wn or t < c):
        unused |= {"w0", "w1", "w2"}
    if with_state and not mom:
        unused |= {"initial_state.m0", "initial_state.m1", "initial_state.m2"}
    if t < c:
        unused |= {"k", "v", "lr0", "lr1", "lr2", "momentum"}
    for name, gj, gt in zip(names, jax_grads, grads, strict=True):
        gt = np.zeros(gj.shape) if gt is None else to_numpy(gt)
        if name in unused:
            assert not np.any(gt) and not np.any(np.asarray(gj)), name
            continue
        assert rel_err(gj, gt) <= OP_TOL, (name, rel_err(gj, gt))


def test_state_dataclasses_agree():
    assert tuple(f.name for f in dataclasses.fields(LaCTState)) == FIELDS
    ref_fields = tuple(f.name for f in dataclasses.fields(ttt_torch_ref.LaCTState))
    assert ref_fields == FIELDS


@pytest.mark.gpu
@pytest.mark.parametrize(
    "mom,muon,muon_dtype", [(False, False, None), (True, True, None), (True, True, "float32")]
)
def test_op_parity_bf16_gpu(mom, muon, muon_dtype):
    t, c = 64, 16
    x, w, state0 = make_inputs(t, seed=1, with_state=True)
    names = ("q", "k", "v", "lr0", "lr1", "lr2")
    # Both sides get the same values: q, k, v rounded to bf16 (the reference computes on them in
    # fp32). Feeding the reference the unrounded values would add the input rounding, which
    # Muon amplifies to 1-2e-2 on its own (tests/ops/lact/test_lact_muon_dtype.py).
    x = {n: x[n].astype(jnp.bfloat16) if n in ("q", "k", "v") else x[n] for n in x}
    o, s = lact_swiglu(
        *(x[n] for n in names),
        **w,
        chunk_size=c,
        momentum=x["momentum"] if mom else None,
        use_muon=muon,
        muon_dtype=muon_dtype,
        initial_state=state0,
    )
    assert o.dtype == jnp.bfloat16 and s.w0.dtype == jnp.float32
    x = {n: v.astype(jnp.float32) for n, v in x.items()}
    with torch.no_grad():
        to, ts = ttt_torch_ref.lact_swiglu(
            *(to_torch(x[n]) for n in names),
            **{n: to_torch(v) for n, v in w.items()},
            chunk_size=c,
            momentum=to_torch(x["momentum"]) if mom else None,
            use_muon=muon,
            initial_state=lact_state_to_torch(state0),
        )
    assert rel_err(o.astype(jnp.float32), to_numpy(to)) <= GPU_BF16_TOL
    for f in ("w0", "w1", "w2"):
        assert rel_err(getattr(s, f), to_numpy(getattr(ts, f))) <= GPU_BF16_TOL, f
