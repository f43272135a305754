"""TTT-Linear / TTT-MLP ops: JAX dual form vs the torch primal-form reference.

Outputs, final states, and gradients with respect to q, k, v, eta, every parameter and the
initial state, fp32 on CPU, relative error <= 1e-5 (OP_TOL).

The token-scale gradient is held to a bound derived from its conditioning instead: it is a sum
over the B * H independent sequences of contributions that cancel (measured in float64 for
`mlp-29-4-3`: contributions up to 37 summing to 2.9, 41x cancellation), so its fp32 error
relative to its own norm is that cancellation times the contributions' rounding, and it moved
with the platform (1.05e-5 on one 2-core CI machine, 4.2e-6 on another, same code). If each
sequence's contribution is right to OP_TOL relative, the sum is off by at most OP_TOL times the
sum of the contributions' magnitudes: that bound is asserted, per element, against the float64
reference (largest error / bound over the cases: 0.048, CPU, jax 0.10.2). Its exactness is
checked in float64 at 1e-12 by `test_float64_exact.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ttt_torch_ref
from parity_tests.convert import state_to_torch, to_numpy, to_torch
from ttt_jax.memory.analysis import compile_lowered
from ttt_jax.ops import TTTLinearState, TTTMLPState, ttt_linear, ttt_mlp
from ttt_jax.testing import GPU_BF16_TOL, OP_TOL, rel_err

B, H, D = 2, 2, 8


def make_inputs(inner, t, c, seed, with_state):
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    n = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape)  # noqa: E731
    x = {
        "q": n((B, t, H, D)),
        "k": n((B, t, H, D)),
        "v": n((B, t, H, D)),
        "eta": 0.2 * jax.nn.sigmoid(n((B, t, H))),
    }
    f = 4 * D
    params = {
        "ln_scale": 1 + n((H, D), 0.1),
        "ln_bias": n((H, D), 0.1),
        "token_scale": 1.0 / jnp.arange(1, c + 1) + n((c,), 0.05),
    }
    if inner == "linear":
        params |= {"W1": n((H, D, D), 0.2), "b1": n((H, D), 0.1)}
    else:
        params |= {
            "W1": n((H, D, f), 0.2),
            "b1": n((H, f), 0.1),
            "W2": n((H, f, D), 0.2),
            "b2": n((H, D), 0.1),
        }
    state = None
    if with_state:
        cls = TTTLinearState if inner == "linear" else TTTMLPState
        state = cls(
            **{
                k: params[k][None] + n((B, *params[k].shape), 0.05)
                for k in (("W1", "b1") if inner == "linear" else ("W1", "b1", "W2", "b2"))
            }
        )
    return x, params, state


def probes(seed, out_shape, state):
    """Random cotangents so every output and state element enters the gradient."""
    ks = jax.random.split(jax.random.PRNGKey(seed + 100), 8)
    r_out = jax.random.normal(ks[0], out_shape)
    r_state = jax.tree.map(
        lambda a, k: jax.random.normal(k, a.shape),
        state,
        jax.tree.unflatten(
            jax.tree.structure(state), list(ks[1 : 1 + len(jax.tree.leaves(state))])
        ),
    )
    return r_out, r_state


def token_scale_contributions(ref_op, x, params, weight_names, c, state0, r_out, r_state):
    """The float64 reference's token-scale gradient per sequence: [B * H, C], row b * H + h the
    gradient of sequence (b, h)'s part of the probe objective. The rows sum to the gradient."""
    d = lambda a: to_torch(a).double()  # noqa: E731
    tx = {k: d(v) for k, v in x.items()}
    tp = {k: d(v) for k, v in params.items()}
    tp["token_scale"].requires_grad_()
    ts0 = None
    if state0 is not None:
        ts0 = state_to_torch(jax.tree.map(lambda a: np.asarray(a, np.float64), state0))
    to, tstate = ref_op(
        tx["q"],
        tx["k"],
        tx["v"],
        tx["eta"],
        **{k: tp[k] for k in weight_names},
        ln_scale=tp["ln_scale"],
        ln_bias=tp["ln_bias"],
        mini_batch_size=c,
        token_scale=tp["token_scale"],
        initial_state=ts0,
    )
    names = [f for f in ("W1", "b1", "W2", "b2") if hasattr(tstate, f)]
    rows = []
    for b in range(B):
        for h in range(H):
            obj = (to[b, :, h] * d(r_out)[b, :, h]).sum() + sum(
                (getattr(tstate, n)[b, h] * d(getattr(r_state, n))[b, h]).sum() for n in names
            )
            (g,) = torch.autograd.grad(obj, tp["token_scale"], retain_graph=True)
            rows.append(g.numpy())
    return np.stack(rows)


def fast(fn, *args):
    """`jax.jit(fn)(*args)` compiled with the fast CPU options: eagerly, every small op of the
    forward and backward compiles on its own, most of the time this file took."""
    return compile_lowered(jax.jit(fn).lower(*args))(*args)


CASES = [
    # inner, T, C, checkpoint_group, initial state
    ("linear", 32, 8, None, False),
    ("linear", 37, 8, 3, True),
    ("linear", 21, 4, 2, False),
    ("linear", 5, 8, None, True),  # shorter than one mini-batch
    ("mlp", 32, 8, None, True),
    ("mlp", 29, 4, 3, False),
]


@pytest.mark.parametrize("inner,t,c,group,with_state", CASES)
def test_op_parity(inner, t, c, group, with_state):
    x, params, state0 = make_inputs(inner, t, c, seed=t + c, with_state=with_state)
    jax_op = ttt_linear if inner == "linear" else ttt_mlp
    ref_op = ttt_torch_ref.ttt_linear if inner == "linear" else ttt_torch_ref.ttt_mlp
    weight_names = [k for k in params if k[0] in "Wb"]

    # --- JAX: outputs, state, gradients of <r_out, o> + <r_state, state>.
    def run(x, params, state0):
        kw = {k: params[k] for k in weight_names}
        return jax_op(
            x["q"],
            x["k"],
            x["v"],
            x["eta"],
            **kw,
            ln_scale=params["ln_scale"],
            ln_bias=params["ln_bias"],
            mini_batch_size=c,
            token_scale=params["token_scale"],
            initial_state=state0,
            checkpoint_group=group,
        )

    o, s = fast(run, x, params, state0)
    r_out, r_state = probes(t, o.shape, s)

    def objective(x, params, state0):
        o, s = run(x, params, state0)
        return jnp.sum(o * r_out) + sum(
            jnp.sum(a * r)
            for a, r in zip(jax.tree.leaves(s), jax.tree.leaves(r_state), strict=True)
        )

    gx, gp, gs = fast(jax.grad(objective, argnums=(0, 1, 2)), x, params, state0)

    # --- torch reference on the same numbers.
    tx = {k: to_torch(v, requires_grad=True) for k, v in x.items()}
    tp = {k: to_torch(v, requires_grad=True) for k, v in params.items()}
    ts0 = state_to_torch(state0, requires_grad=True) if state0 is not None else None
    to, tstate = ref_op(
        tx["q"],
        tx["k"],
        tx["v"],
        tx["eta"],
        **{k: tp[k] for k in weight_names},
        ln_scale=tp["ln_scale"],
        ln_bias=tp["ln_bias"],
        mini_batch_size=c,
        token_scale=tp["token_scale"],
        initial_state=ts0,
    )
    state_names = [f for f in ("W1", "b1", "W2", "b2") if hasattr(tstate, f)]
    obj = (to * to_torch(r_out)).sum() + sum(
        (getattr(tstate, n) * to_torch(getattr(r_state, n))).sum() for n in state_names
    )
    leaves = (
        list(tx.values())
        + list(tp.values())
        + ([getattr(ts0, n) for n in state_names] if ts0 else [])
    )
    grads = torch.autograd.grad(obj, leaves, allow_unused=True)

    assert rel_err(o, to_numpy(to)) <= OP_TOL
    for n in state_names:
        assert rel_err(getattr(s, n), to_numpy(getattr(tstate, n))) <= OP_TOL, n
    jax_grads = (
        [gx[k] for k in tx]
        + [gp[k] for k in tp]
        + ([getattr(gs, n) for n in state_names] if ts0 else [])
    )
    names = list(tx) + list(tp) + ([f"initial_state.{n}" for n in state_names] if ts0 else [])
    for name, gj, gt in zip(names, jax_grads, grads, strict=True):
        gt = np.zeros(gj.shape) if gt is None else to_numpy(gt)
        if name.startswith(("W", "b")) and with_state:
            # With an initial state the parameters W1.. are unused: both sides give zero.
            assert np.abs(np.asarray(gj)).max() == 0 and np.abs(gt).max() == 0, name
            continue
        if name == "token_scale":
            continue  # the derived bound below
        assert rel_err(gj, gt) <= OP_TOL, (name, rel_err(gj, gt))

    parts = token_scale_contributions(ref_op, x, params, weight_names, c, state0, r_out, r_state)
    err = np.abs(np.asarray(gp["token_scale"], np.float64) - parts.sum(0))
    bound = OP_TOL * np.abs(parts).sum(0)
    assert np.all(err <= bound), ("token_scale", err, bound)


@pytest.mark.gpu
@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_op_parity_bf16_gpu(inner):
    x, params, _ = make_inputs(inner, 64, 16, seed=3, with_state=False)
    jax_op = ttt_linear if inner == "linear" else ttt_mlp
    ref_op = ttt_torch_ref.ttt_linear if inner == "linear" else ttt_torch_ref.ttt_mlp
    kw = {k: params[k] for k in params if k[0] in "Wb"}
    xb = {k: (v.astype(jnp.bfloat16) if k != "eta" else v) for k, v in x.items()}
    o, s = jax_op(
        xb["q"],
        xb["k"],
        xb["v"],
        xb["eta"],
        **kw,
        ln_scale=params["ln_scale"],
        ln_bias=params["ln_bias"],
        mini_batch_size=16,
        token_scale=params["token_scale"],
    )
    assert o.dtype == jnp.bfloat16 and s.W1.dtype == jnp.float32
    with torch.no_grad():
        to, ts = ref_op(
            *(to_torch(x[k]) for k in ("q", "k", "v", "eta")),
            **{k: to_torch(v) for k, v in kw.items()},
            ln_scale=to_torch(params["ln_scale"]),
            ln_bias=to_torch(params["ln_bias"]),
            mini_batch_size=16,
            token_scale=to_torch(params["token_scale"]),
        )
    assert rel_err(o.astype(jnp.float32), to_numpy(to)) <= GPU_BF16_TOL
    assert rel_err(s.W1, to_numpy(ts.W1)) <= GPU_BF16_TOL
