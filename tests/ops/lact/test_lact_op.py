"""LaCT op (SPEC 3.2, issue 3), forward: streaming, the partial last chunk, momentum and rate
semantics, weight norm, Muon's orthogonalisation, custom and autodiff forwards, bf16 inputs and
the state dtype. Gradients: `test_lact_grads.py`; bad input and the debug finiteness check:
`test_lact_errors.py`.

Muon cases compare in float64 (`jax.enable_x64`, fp64 inputs and state), forwards and
gradients alike: the Newton-Schulz iteration amplifies fp32 rounding about 1e3-fold, so two
exact orderings of the same math can differ by 2-3e-5 in fp32 (measured with the default CPU
compile), above the 1e-5 of SPEC 5, while they agree to ~1e-14 in float64; an fp32 comparison
there passes or fails with the platform's rounding. Everything else is compared in fp32
(custom vs autodiff: ~1e-7). Inputs and compiled runs: `lact_helpers.py`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from tests.memory_helpers import run_fast
from tests.ops.lact.lact_helpers import (
    FIELDS,
    SHAPES,
    T_MAX,
    B,
    C,
    D,
    H,
    assert_states_close,
    call,
    compile_fast,
    forward,
    make_inputs,
    sliced,
    x64,
)
from ttt_jax.ops.lact.math import newton_schulz5
from ttt_jax.testing import GPU_BF16_TOL, OP_TOL, rel_err

# --- forward semantics


@pytest.mark.parametrize("split", [C, 4 * C])
def test_streaming_two_calls_equal_one(split):
    # T = 18: the second call ends with a partial chunk of 2 tokens (at split 4C it is nothing
    # but that); momentum, Muon and weight norm all on, starting from a state whose row norms
    # differ from the slow weights'. Muon: in float64 (module docstring).
    kw = dict(use_muon=True, state_dtype=jnp.float64)
    with x64(np.float64):
        x, w, s0 = make_inputs(T_MAX, seed=1, dtype=np.float64)
        o, s = forward(T_MAX, seed=1, dtype=np.float64, use_muon=True)
        o1, s1 = run_fast(lambda x, s: call(x, w, s, **kw), sliced(x, 0, split), s0)
        o2, s2 = run_fast(lambda x, s: call(x, w, s, **kw), sliced(x, split, T_MAX), s1)
    assert o1.dtype == s2.w0.dtype == jnp.float64
    assert rel_err(np.concatenate([o1, o2], 1), o) <= OP_TOL
    assert_states_close(s2, s)


def test_partial_last_chunk_is_read_but_never_updates():
    o12, s12 = forward(12)
    o14, s14 = forward(14)
    o16, _ = forward(16)
    for f in FIELDS:
        assert np.array_equal(getattr(s14, f), getattr(s12, f)), f
    # The 2 extra tokens read the state after chunk 3, as they do inside a complete chunk 4.
    assert rel_err(o14[:, :12], o12) <= OP_TOL
    assert rel_err(o14, o16[:, :14]) <= OP_TOL


def test_shorter_than_one_chunk_and_empty_sequences_keep_the_state():
    x, w, s0 = make_inputs(3)
    o, s = run_fast(lambda x, s: call(x, w, s), x, s0)
    assert o.shape == (B, 3, H, D)
    assert_states_close(s, s0, tol=0.0)
    # An empty sequence is a caller's mistake (issue 20): a ValueError naming q, before tracing.
    with pytest.raises(ValueError, match="T axis"):
        call(sliced(x, 0, 0), w, None, mom=False)


def test_momentum_uses_the_chunk_mean_of_beta():
    x, w, s0 = make_inputs(12, seed=2)
    beta = x["momentum"]
    mean = np.repeat(beta.reshape(B, 3, C, H).mean(2), C, axis=1)
    run = compile_fast(lambda x: call(x, w, s0), x)
    o_var, s_var = run(x)
    o_mean, s_mean = run(dict(x, momentum=mean))
    assert not np.allclose(beta, mean)
    assert rel_err(o_var, o_mean) <= OP_TOL
    assert_states_close(s_var, s_mean)


def test_rates_are_per_token():
    # A token whose three rates are 0 teaches nothing: its key and value cannot matter.
    x, w, s0 = make_inputs(12, seed=3)
    zero = {f"lr{j}": np.where(np.arange(12)[:, None] == 5, 0.0, x[f"lr{j}"]) for j in range(3)}
    shift = np.where(np.arange(12)[:, None, None] == 5, 1.0, 0.0).astype(np.float32)
    moved = dict(x, **zero, k=x["k"] + 3 * shift, v=x["v"] - 2 * shift)
    run = compile_fast(lambda x: call(x, w, s0), x)
    o_a, s_a = run(dict(x, **zero))
    o_b, s_b = run(moved)
    o_c, _ = run(dict(moved, lr1=x["lr1"]))  # and with its own rate it does matter
    assert rel_err(o_b, o_a) <= OP_TOL
    assert_states_close(s_b, s_a)
    assert rel_err(o_c[:, 8:], o_a[:, 8:]) > 1e-3


def test_weight_norm_restores_the_slow_weights_row_norms():
    _, w, s0 = make_inputs(T_MAX)
    _, s = forward(T_MAX)
    _, s_free = forward(T_MAX, weight_norm=False)

    def row_norms(w):
        return np.linalg.norm(np.asarray(w, np.float64), axis=-1)

    for f in ("w0", "w1", "w2"):
        target = np.broadcast_to(row_norms(w[f]), (B, *SHAPES[f][:2]))
        # The initial state's rows are off target; after a step they are back on it (up to the
        # 1e-5 of the norm's denominator).
        assert rel_err(row_norms(getattr(s0, f)), target) > 1e-2
        assert rel_err(row_norms(getattr(s, f)), target) <= 1e-4, f
        assert rel_err(row_norms(getattr(s_free, f)), target) > 1e-2, f


def test_newton_schulz_orthogonalises_tall_and_wide_alike():
    # In float64: the equalities below are exact math, which fp32 shows only up to the
    # rounding the iteration amplifies (module docstring).
    g = np.random.default_rng(4).standard_normal((2, 3, 6, 10))
    ns = functools.partial(newton_schulz5, cd=jnp.float64)
    with x64(np.float64):
        x, scaled = run_fast(lambda g: (ns(g), ns(7.0 * g)), g)
        tall = run_fast(lambda g: jnp.swapaxes(ns(jnp.swapaxes(g, -1, -2)), -1, -2), g)
    assert x.dtype == jnp.float64
    sv = np.linalg.svd(np.asarray(x), compute_uv=False)
    # The SPEC coefficients push every singular value into about [0.7, 1.2] in 5 steps.
    assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())
    assert rel_err(tall, x) <= 1e-6
    assert rel_err(scaled, x) <= OP_TOL  # scale invariant


def test_custom_and_autodiff_forwards_agree():
    # Muon: in float64 (module docstring).
    o, s = forward(T_MAX, seed=1, dtype=np.float64, use_muon=True)
    o_ad, s_ad = forward(
        T_MAX, seed=1, dtype=np.float64, use_muon=True, backward="autodiff", checkpoint_group=2
    )
    assert o.dtype == s_ad.w0.dtype == jnp.float64
    assert rel_err(o, o_ad) <= OP_TOL
    assert_states_close(s, s_ad)


def test_bf16_inputs_keep_fp32_state():
    # Without Muon (5e-3 from the fp32 twin here): Newton-Schulz in bf16 amplifies the bf16
    # rounding of its iterate, so a Muon run's state sits 2.4e-2 from its fp32 twin.
    x, w, s0 = make_inputs(14, seed=5)
    bf = {k: v.astype(jnp.bfloat16) if k in ("q", "k", "v") else v for k, v in x.items()}
    o, s = run_fast(lambda x: call(x, w, s0), bf)
    o32, s32 = run_fast(lambda x: call(x, w, s0), {k: v.astype(jnp.float32) for k, v in bf.items()})
    assert o.dtype == jnp.bfloat16
    assert all(getattr(s, f).dtype == jnp.float32 for f in FIELDS)
    assert rel_err(o.astype(jnp.float32), o32) <= GPU_BF16_TOL
    assert_states_close(s, s32, tol=GPU_BF16_TOL)


def test_state_dtype_argument():
    x, w, _ = make_inputs(8)
    _, s = run_fast(lambda x: call(x, w, state_dtype=jnp.bfloat16), x)
    assert all(getattr(s, f).dtype == jnp.bfloat16 for f in FIELDS)
