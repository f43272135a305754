"""LaCT op (SPEC 3.2), gradients: the custom VJP against its autodiff twin for every case and
memory knob, under `jax.checkpoint` and inside `lax.scan`; low-rank initial weights against a
dense twin; bf16 gradients in the input dtypes.

Muon cases compare in float64 (`jax.enable_x64`): the Newton-Schulz iteration amplifies fp32
rounding about 1e3-fold, so two exact orderings of the same math can differ by 2-3e-5 in fp32,
above the 1e-5 of SPEC 5, while they agree to ~1e-14 in float64 (`test_lact_op.py` says more).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tests.memory_helpers import run_fast
from tests.ops.lact.lact_helpers import (
    DH,
    FIELDS,
    D,
    H,
    assert_grads_close,
    call,
    grads,
    make_inputs,
    objective,
)
from ttt_jax.ops import lact_low_rank_weight
from ttt_jax.testing import GPU_BF16_TOL, OP_TOL, rel_err

F32, F64 = np.float32, np.float64
# T (13, 14, 18: partial last chunks), momentum, Muon, weight norm, initial state, dtype, and
# the checkpoint groups of the custom and the autodiff side.
GRAD_CASES = {
    "plain": (18, False, False, True, False, F32, None, None),
    "momentum": (18, True, False, True, True, F32, 3, None),
    "momentum_no_wn": (13, True, False, False, True, F32, None, 2),
    "muon": (18, True, True, True, True, F64, 2, None),
    "muon_no_momentum_no_wn": (14, False, True, False, False, F64, None, 1),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_custom_vjp_equals_autodiff(case):
    t, mom, muon, wn, state, dtype, g_custom, g_auto = GRAD_CASES[case]
    common = dict(t=t, mom=mom, with_state=state, dtype=dtype, use_muon=muon, weight_norm=wn)
    custom = grads(**common, backward="custom", checkpoint_group=g_custom)
    auto = grads(**common, backward="autodiff", checkpoint_group=g_auto)
    custom, auto = dict(custom), dict(auto)  # shallow copies: the cached results stay intact
    if not mom:  # momentum was not passed: nothing flows to it
        assert not np.any(np.asarray(custom["x"]["momentum"]))
        custom["x"] = {k: v for k, v in custom["x"].items() if k != "momentum"}
        auto["x"] = {k: v for k, v in auto["x"].items() if k != "momentum"}
    if state and not wn:  # without weight norm a passed state leaves the slow weights unread
        assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(custom["w"]))
        custom, auto = (dict(g, w=None) for g in (custom, auto))
    if state and not mom:
        custom["state"] = custom["state"].replace(m0=None, m1=None, m2=None)
        auto["state"] = auto["state"].replace(m0=None, m1=None, m2=None)
    assert_grads_close(custom, auto)


MOMENTUM = dict(t=18, mom=True, with_state=True, dtype=F32, use_muon=False, weight_norm=True)
KNOBS = [
    dict(backward="custom", checkpoint_group=2),
    dict(backward="autodiff", checkpoint_group=1, remat_policy="dots"),
    dict(backward="autodiff", checkpoint_group=2, remat_policy="save_names:lact_grad,lact_hidden"),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "_".join(map(str, k.values())))
def test_gradients_identical_for_every_knob(knobs):
    ref = grads(**MOMENTUM, backward="custom", checkpoint_group=None)
    assert_grads_close(grads(**MOMENTUM, **knobs), ref, tol=1e-6)


def momentum_grads(make_loss):
    """Gradients w.r.t. `(x, w, state)` of `make_loss(backward)` on the `MOMENTUM` inputs."""
    x, w, s = make_inputs(18, seed=18)
    return {
        backward: run_fast(jax.grad(make_loss(backward), argnums=(0, 1, 2)), x, w, s)
        for backward in ("custom", "autodiff")
    }


def test_custom_vjp_under_jax_checkpoint():
    def make_loss(backward):
        loss = functools.partial(objective, mom=True, backward=backward)
        return jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)

    g = momentum_grads(make_loss)
    assert_grads_close(g["custom"], g["autodiff"])
    plain = grads(**MOMENTUM, backward="custom", checkpoint_group=None)
    assert_grads_close(g["custom"], (plain["x"], plain["w"], plain["state"]), tol=1e-6)


def test_custom_vjp_inside_lax_scan():
    # The sequence streamed through a scan in two pieces of 9 tokens, each ending in a partial
    # chunk (the carried state is the one after the piece's last complete chunk). The body is
    # checkpointed too, as a scan over layers would be.
    def make_loss(backward):
        def loss(x, w, s):
            xs = jax.tree.map(lambda a: jnp.stack([a[:, :9], a[:, 9:]]), x)

            def body(carry, xi):
                total, s = carry
                o, s = call(xi, w, s, backward=backward)
                return (total + jnp.sum(jnp.sin(o)), s), None

            (total, s), _ = lax.scan(jax.checkpoint(body), (jnp.zeros(()), s), xs)
            return total + sum(jnp.sum(jnp.cos(getattr(s, f))) for f in FIELDS)

        return loss

    g = momentum_grads(make_loss)
    assert_grads_close(g["custom"], g["autodiff"])


def test_low_rank_weights_get_the_dense_twins_gradients():
    r = 3
    x, w, _ = make_inputs(14, seed=6)
    rng = np.random.default_rng(7)
    left = {f: (0.3 * rng.standard_normal((H, DH, r))).astype(np.float32) for f in ("w0", "w2")}
    right = {f: (0.3 * rng.standard_normal((H, r, D))).astype(np.float32) for f in ("w0", "w2")}

    def low_rank(left, right, x):
        dense = {f: lact_low_rank_weight(left[f], right[f]) for f in ("w0", "w2")}
        return objective(x, dict(dense, w1=w["w1"]), None, mom=True)

    def dense(w02, x):
        return objective(x, dict(w02, w1=w["w1"]), None, mom=True)

    (g_left, g_right), w0 = run_fast(
        lambda *a: (
            jax.grad(low_rank, argnums=(0, 1))(*a),
            lact_low_rank_weight(a[0]["w0"], a[1]["w0"]),
        ),
        left,
        right,
        x,
    )
    w02 = {f: left[f] @ right[f] + 0.5 * np.eye(DH, D, dtype=np.float32) for f in ("w0", "w2")}
    assert rel_err(w0, w02["w0"]) <= 1e-6
    g_dense = run_fast(jax.grad(dense), w02, x)
    for f in ("w0", "w2"):
        gd = np.asarray(g_dense[f], np.float64)
        want_left = np.einsum("hij,hkj->hik", gd, right[f])
        want_right = np.einsum("hik,hij->hkj", left[f], gd)
        assert np.any(np.asarray(g_left[f])) and np.any(np.asarray(g_right[f]))
        assert rel_err(g_left[f], want_left) <= OP_TOL, f
        assert rel_err(g_right[f], want_right) <= OP_TOL, f


def test_bf16_gradients_come_back_in_the_input_dtypes():
    x, w, s = make_inputs(10, seed=8)
    x = {k: v.astype(jnp.bfloat16) if k in ("q", "k", "v") else v for k, v in x.items()}
    g = {}
    for backward in ("custom", "autodiff"):
        fn = functools.partial(objective, mom=True, backward=backward)
        g[backward] = run_fast(jax.grad(fn, argnums=(0, 1, 2)), x, w, s)
    for (_, a), b in zip(
        jax.tree_util.tree_leaves_with_path(g["custom"]), jax.tree.leaves((x, w, s)), strict=True
    ):
        assert a.dtype == b.dtype
    for a, b in zip(jax.tree.leaves(g["custom"]), jax.tree.leaves(g["autodiff"]), strict=True):
        assert rel_err(a, b) <= GPU_BF16_TOL
