"""LaCT op (SPEC 3.2): bad input is a ValueError naming the argument; the debug mode's
finiteness check on the rates, eager and under jit (checkify)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from tests.memory_helpers import run_fast
from tests.ops.lact.lact_helpers import (
    DH,
    TOKENS,
    B,
    C,
    D,
    H,
    call,
    compile_fast,
    make_inputs,
)
from ttt_jax.ops import lact_low_rank_weight, lact_swiglu

# --- bad input


def _bad_state():
    _, _, s = make_inputs(8)
    return s.replace(m1=np.zeros((B, H, D, DH + 1), np.float32))


def zeros(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


BAD = [
    (dict(q=zeros(B, 8, H)), "q must have rank 4 with shape (B, T, H, D), got shape"),
    (dict(k=zeros(B, 8, H, D + 1)), f"k has shape (2, 8, 2, 5) but q gives D={D}"),
    (dict(lr1=zeros(B, 7, H)), "lr1 has shape (2, 7, 2) but q gives T=8"),
    (dict(momentum=zeros(B, 8, H + 1)), "momentum has shape (2, 8, 3) but q gives H=2"),
    (dict(w0=zeros(H, DH, D + 1)), "w0 has shape (2, 6, 5) but q gives D=4"),
    (dict(w1=zeros(H, D, DH + 1)), "w1 has shape (2, 4, 7) but w0 gives Dh=6"),
    (dict(w2=zeros(H + 1, DH, D)), "w2 has shape (3, 6, 4) but q gives H=2"),
    (dict(chunk_size=0), "chunk_size must be a positive int, got 0"),
    (dict(chunk_size=2.0), "chunk_size must be a positive int, got 2.0"),
    (dict(checkpoint_group=0), "checkpoint_group must be a positive int, got 0"),
    (dict(remat_policy="dots"), "remat_policy='dots' needs checkpoint_group"),
    (dict(checkpoint_group=2, remat_policy="most"), "remat_policy='most' is not a known policy"),
    (dict(backward="manual"), "backward='manual' is not one of 'custom', 'autodiff'"),
    (dict(use_muon=1), "use_muon must be a bool, got 1"),
    (dict(q=zeros(B, 8, H, D, dtype=np.int32)), "q must have a floating dtype, got int32"),
    (dict(v=zeros(B, 8, H, D, dtype=jnp.bfloat16)), "q, k, v must share a dtype"),
    (dict(state_dtype=jnp.int32), "state_dtype must be a float dtype"),
    (dict(muon_dtype="int8"), "muon_dtype must be a float dtype, got 'int8'"),
    (dict(initial_state="state"), "initial_state must be a LaCTState"),
    (dict(initial_state=_bad_state), "initial_state.m1 has shape (2, 2, 4, 7) but"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_a_value_error_naming_the_argument(override, message):
    x, w, _ = make_inputs(8)
    override = {k: v() if v is _bad_state else v for k, v in override.items()}
    args = {**x, **w, "chunk_size": C, **override}
    tokens = [args.pop(n) for n in TOKENS]
    with pytest.raises(ValueError, match=re.escape(message)):
        lact_swiglu(*tokens, **args)


def test_low_rank_rank_and_shapes_are_checked():
    with pytest.raises(ValueError, match=r"rank r=5 must be <= min\(rows, cols\) = min\(6, 4\)"):
        lact_low_rank_weight(zeros(H, DH, 5), zeros(H, 5, D))
    with pytest.raises(ValueError, match=r"w_right has shape \(2, 4, 4\) but w_left gives r=3"):
        lact_low_rank_weight(zeros(H, DH, 3), zeros(H, 4, D))


# --- debug mode


def poke(a, value):
    """A copy of `a: [B, T, H]` with one entry set to `value`."""
    a = np.array(a)
    a[1, 3, 0] = value
    return a


def test_debug_mode_rejects_non_finite_rates():
    x, w, _ = make_inputs(8)
    # Eagerly the check raises at once.
    with pytest.raises(checkify.JaxRuntimeError, match="lr0 has non-finite values"):
        call(dict(x, lr0=poke(x["lr0"], np.inf)), w, debug=True)
    # Under jit it is functionalised with checkify; the error comes back, also through a
    # gradient, and finite inputs pass.
    loss = jax.grad(lambda x: jnp.sum(call(x, w, mom=False, debug=True)[0]))
    run = compile_fast(checkify.checkify(loss), x)
    err, _ = run(dict(x, lr2=poke(x["lr2"], np.nan)))
    with pytest.raises(checkify.JaxRuntimeError, match="lr2 has non-finite values"):
        err.throw()
    err, g = run(x)
    assert err.get() is None and np.all(np.isfinite(np.asarray(g["q"])))
    with pytest.raises(ValueError, match="checkify"):  # never silently dropped under jit
        jax.jit(lambda x: call(x, w, debug=True)).lower(x)
    # Without debug the op does not look (the NaN flows into the outputs).
    o = run_fast(lambda x: call(x, w, mom=False)[0], dict(x, lr2=poke(x["lr2"], np.nan)))
    assert not np.all(np.isfinite(np.asarray(o)))
