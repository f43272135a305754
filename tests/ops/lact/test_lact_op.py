"""LaCT op (SPEC 3.2, issue 3): streaming, the partial last chunk, the custom VJP against its
autodiff twin (also under `jax.checkpoint` and inside `lax.scan`, for every memory knob),
low-rank initial weights against a dense twin, momentum and rate semantics, weight norm,
Muon's orthogonalisation, bf16 inputs, named ValueErrors and the debug finiteness check.

Muon cases compare in float64 (`jax.enable_x64`, fp64 inputs and state), forwards and
gradients alike: the Newton-Schulz iteration amplifies fp32 rounding about 1e3-fold, so two
exact orderings of the same math can differ by 2-3e-5 in fp32 (measured with the default CPU
compile), above the 1e-5 of SPEC 5, while they agree to ~1e-14 in float64; an fp32 comparison
there passes or fails with the platform's rounding. Everything else is compared in fp32
(custom vs autodiff: ~1e-7). Every program is compiled once with the fast CPU options
(`memory_helpers.run_fast`) and inputs are made with numpy (eager JAX ops compile one by one):
the file takes about 45 s on 2 busy cores.
"""

from __future__ import annotations

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import checkify

from tests.memory_helpers import run_fast
from ttt_jax.memory.analysis import compile_lowered
from ttt_jax.ops import LaCTState, lact_low_rank_weight, lact_swiglu
from ttt_jax.ops.lact.math import newton_schulz5
from ttt_jax.testing import GPU_BF16_TOL, OP_TOL, rel_err

B, H, D, DH, C = 2, 2, 4, 6, 4
TOKENS = ("q", "k", "v", "lr0", "lr1", "lr2")
FIELDS = ("w0", "w1", "w2", "m0", "m1", "m2")
SHAPES = {"w0": (H, DH, D), "w1": (H, D, DH), "w2": (H, DH, D)}


def make_inputs(t, seed=0, dtype=np.float32):
    """`(x, w, state)` as numpy arrays: token inputs `[B, t, ...]`, slow weights, and an initial
    state away from the slow weights (other row norms, non-zero momentum). numpy, not
    `jax.random`: every eager JAX op compiles once per shape, which costs more than the tests."""
    rng = np.random.default_rng(seed)

    def n(shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    def sigmoid(shape):
        return 1 / (1 + np.exp(-n(shape)))

    x = {
        "q": n((B, t, H, D)),
        "k": n((B, t, H, D)),
        "v": n((B, t, H, D)),
        **{f"lr{j}": 0.2 * sigmoid((B, t, H)) for j in range(3)},
        "momentum": sigmoid((B, t, H)),
    }
    w = {f: n(shape, 0.5) for f, shape in SHAPES.items()}
    state = LaCTState(
        **{f: w[f][None] + n((B, *SHAPES[f]), 0.1) for f in ("w0", "w1", "w2")},
        **{f"m{j}": n((B, *SHAPES[f"w{j}"]), 0.1) for j in range(3)},
    )
    return x, w, state


def call(x, w, state=None, mom=True, **kw):
    return lact_swiglu(
        *(x[n] for n in TOKENS),
        **w,
        momentum=x["momentum"] if mom else None,
        initial_state=state,
        chunk_size=kw.pop("chunk_size", C),
        **kw,
    )


def sliced(x, a, b):
    return {k: v[:, a:b] for k, v in x.items()}


def compile_fast(fn, *args):
    """`jax.jit(fn)` compiled once for `args` like `run_fast` does, for programs called more
    than once."""
    return compile_lowered(jax.jit(fn).lower(*args))


T_MAX = 18


@functools.cache
def forward(t, seed=0, with_state=True, dtype=np.float32, **kw):
    """Jitted forward on the first t tokens of `make_inputs(T_MAX, seed, dtype)` (cached:
    several tests read the same run); float64 runs under x64 with a float64 state."""
    with x64(dtype):
        x, w, s = make_inputs(T_MAX, seed, dtype)
        if dtype == np.float64:
            kw["state_dtype"] = jnp.float64
        return run_fast(
            lambda x, w, s: call(x, w, s, **kw), sliced(x, 0, t), w, s if with_state else None
        )


def assert_states_close(a: LaCTState, b: LaCTState, tol=OP_TOL):
    for f in FIELDS:
        assert rel_err(getattr(a, f), getattr(b, f)) <= tol, f


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


# --- gradients: the custom VJP against autodiff


def objective(x, w, s, mom, **kw):
    """`sum(o * r) + sum_f <state_f, r_f>` with fixed random cotangents `r`: every output and
    every field of the final state enters the gradient."""
    o, st = call(x, w, s, mom=mom, **kw)
    keys = jax.random.split(jax.random.PRNGKey(99), 7)
    total = jnp.sum(o * jax.random.normal(keys[0], o.shape, o.dtype))
    for key, f in zip(keys[1:], FIELDS, strict=True):
        leaf = getattr(st, f)
        total = total + jnp.sum(leaf * jax.random.normal(key, leaf.shape, leaf.dtype))
    return total


def x64(dtype):
    return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


@functools.cache
def grads(t, mom, with_state, dtype, **kw):
    """Gradients of `objective` w.r.t. tokens (momentum included), slow weights and state."""
    with x64(dtype):
        x, w, s = make_inputs(t, seed=t, dtype=dtype)
        if dtype == np.float64:
            kw["state_dtype"] = jnp.float64
        fn = jax.grad(functools.partial(objective, mom=mom, **kw), argnums=(0, 1, 2))
        g = run_fast(fn, x, w, s if with_state else None)
        return {"x": g[0], "w": g[1], "state": g[2]}


def assert_grads_close(a, b, tol=OP_TOL):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, ga), gb in zip(flat_a, flat_b, strict=True):
        name = jax.tree_util.keystr(path)
        assert np.any(np.asarray(gb)), f"{name}: zero gradient, the test would prove nothing"
        assert rel_err(ga, gb) <= tol, (name, rel_err(ga, gb))


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
