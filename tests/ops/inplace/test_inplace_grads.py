"""In-Place TTT op (SPEC 3.3), gradients: every implementation against the reference (with
clipping, packed and not), the custom backward against autodiff without clipping and initial
state, under `jax.checkpoint` and inside `lax.scan`, and the memory knobs leave the gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from tests.ops.inplace.inplace_helpers import (
    ETA,
    GRAD_KEYS,
    HI,
    IMPLS,
    SEGMENTS,
    TAU,
    Bn,
    C,
    D,
    grads_of,
    make_inputs,
    run_op,
    run_ref,
)
from ttt_jax.ops.inplace.op import inplace_ttt
from ttt_jax.testing import rel_err


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_gradients_of_every_implementation_equal_the_reference(packed):
    inputs = make_inputs(seed=4)
    seg = dict(segment_ids=SEGMENTS) if packed else {}
    # Clipping on, so that its backward is covered (it is active: see the test above).
    g_ref = grads_of(lambda p, e: run_ref(p, e, clip_tau=TAU, **seg), inputs)
    seg = dict(segment_ids=jnp.asarray(SEGMENTS)) if packed else {}
    for prefix, backward in IMPLS:
        g = grads_of(
            lambda p, e, pr=prefix, bw=backward: run_op(
                p, e, clip_tau=TAU, prefix=pr, backward=bw, **seg
            ),
            inputs,
        )
        for key in GRAD_KEYS:
            if key == "w_down" and not packed:
                # w_init replaces w_down for the only document: no gradient either way.
                assert float(jnp.abs(g[key]).max()) == 0.0
                continue
            assert rel_err(g[key], g_ref[key]) <= 1e-5, (prefix, backward, key)


@pytest.mark.parametrize("t", [4 * C + 2, C - 1])
def test_custom_backward_equals_autodiff_without_clipping_and_without_initial_state(t):
    inputs = make_inputs(seed=5, t=t)
    del inputs["w_init"]
    g_auto = grads_of(lambda p, e: run_op(p, e, backward="autodiff"), inputs)
    g_cust = grads_of(lambda p, e: run_op(p, e, backward="custom"), inputs)
    for key in GRAD_KEYS[:-1]:
        if t < C and key in ("target", "w_target", "conv_kernel", "eta"):
            # No complete chunk: nothing is learned, these get exactly no gradient.
            assert float(jnp.abs(g_cust[key]).max()) == 0.0, key
            continue
        assert rel_err(g_cust[key], g_auto[key]) <= 1e-5, (t, key)


def test_custom_backward_equals_autodiff_under_checkpoint_and_inside_scan():
    inputs = make_inputs(seed=6, t=3 * C)
    del inputs["w_init"]
    layers = 2
    stacked = {
        k: jnp.stack([inputs[k], 1.1 * inputs[k]]) for k in ("w_down", "w_target", "conv_kernel")
    }
    stacked["eta"] = jnp.array([ETA, 0.5 * ETA])
    ct = jax.random.normal(jax.random.key(11), (Bn, 3 * C, D))

    def loss(params, backward, remat):
        def layer(z, p):
            def apply(z, p):
                o, _ = inplace_ttt(
                    z,
                    inputs["target"],
                    w_down=p["w_down"],
                    w_target=p["w_target"],
                    conv_kernel=p["conv_kernel"],
                    eta=p["eta"],
                    chunk_size=C,
                    backward=backward,
                )
                # Map back to F features so that the next layer's z depends on this one.
                return jnp.tanh(jnp.einsum("btd,df->btf", o, p["w_down"], precision=HI))

            fn = jax.checkpoint(apply) if remat else apply
            return fn(z, p), None

        z, _ = jax.lax.scan(
            layer, params["z"], {k: v for k, v in params.items() if k != "z"}, length=layers
        )
        return jnp.sum(z[..., :D] * ct)

    params = dict(stacked, z=inputs["z"])
    for remat in (False, True):
        g_auto = jax.jit(jax.grad(functools.partial(loss, backward="autodiff", remat=remat)))(
            params
        )
        g_cust = jax.jit(jax.grad(functools.partial(loss, backward="custom", remat=remat)))(params)
        for key in params:
            assert rel_err(g_cust[key], g_auto[key]) <= 1e-5, (remat, key)


def test_memory_knobs_do_not_change_gradients():
    inputs = make_inputs(seed=7, t=5 * C)
    g0 = grads_of(lambda p, e: run_op(p, e, backward="autodiff"), inputs)
    cases = [
        ("autodiff", dict(checkpoint_group=2, remat_policy="dots")),
        ("autodiff", dict(checkpoint_group=3, remat_policy="save_names:inplace_delta")),
        ("custom", dict(checkpoint_group=2, remat_policy="dots")),
    ]
    for backward, knobs in cases:
        g = grads_of(lambda p, e, kn=knobs, bw=backward: run_op(p, e, backward=bw, **kn), inputs)
        for key in GRAD_KEYS:
            if key != "w_down":
                assert rel_err(g[key], g0[key]) <= 1e-6, (knobs, backward, key)
