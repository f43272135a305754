"""Shared by the LaCT op tests (`test_lact_op.py`, `test_lact_grads.py`, `test_lact_errors.py`):
numpy inputs, the op call, and the cached fast-compiled forwards and gradients (one cache per
test process, so a run several tests read compiles once).

Every program is compiled once with the fast CPU options (`tests.memory_helpers.run_fast`) and
inputs are made with numpy (eager JAX ops compile one by one).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tests.memory_helpers import run_fast
from ttt_jax.memory.analysis import compile_lowered
from ttt_jax.ops import LaCTState, lact_swiglu
from ttt_jax.ops.core import wide_dtype
from ttt_jax.testing import OP_TOL, rel_err

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


# --- gradients: the custom VJP against autodiff


def objective(x, w, s, mom, **kw):
    """`sum(o * r) + sum_f <state_f, r_f>` with fixed random cotangents `r`: every output and
    every field of the final state enters the gradient."""
    o, st = call(x, w, s, mom=mom, **kw)
    keys = jax.random.split(jax.random.PRNGKey(99), 7)
    # Summed in the widest dtype present (what implicit promotion would give: fp32 under bf16
    # outputs and an fp32 state), written out for the strict promotion the tests run under.
    wide = wide_dtype(o.dtype, *(getattr(st, f).dtype for f in FIELDS))
    total = jnp.sum(o * jax.random.normal(keys[0], o.shape, o.dtype)).astype(wide)
    for key, f in zip(keys[1:], FIELDS, strict=True):
        leaf = getattr(st, f)
        total = total + jnp.sum(leaf * jax.random.normal(key, leaf.shape, leaf.dtype)).astype(wide)
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
