"""TTT-Linear / TTT-MLP ops: streaming, padding, dtypes, memory knobs, primal twin, bad input.

The multi-token programs run jitted and compiled with the fast CPU options
(`tests.memory_helpers.run_fast`): compiling is most of a test's time, eager dispatch compiles
every small op on its own, and the options change no number the tests look at.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from tests.memory_helpers import run_fast
from ttt_jax.ops import (
    TTTLinearState,
    ttt_linear,
    ttt_linear_primal,
    ttt_mlp,
    ttt_mlp_primal,
)
from ttt_jax.testing import OP_TOL, rel_err

B, H, D = 2, 3, 8


def inputs(inner, t, seed=0, dtype=jnp.float32):
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 12))
    n = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape)  # noqa: E731
    x = dict(
        q=n((B, t, H, D)).astype(dtype),
        k=n((B, t, H, D)).astype(dtype),
        v=n((B, t, H, D)).astype(dtype),
        eta=0.2 * jax.nn.sigmoid(n((B, t, H))),
    )
    p = dict(ln_scale=1 + n((H, D), 0.1), ln_bias=n((H, D), 0.1))
    if inner == "linear":
        p |= dict(W1=n((H, D, D), 0.2), b1=n((H, D), 0.1))
    else:
        p |= dict(
            W1=n((H, D, 4 * D), 0.2),
            b1=n((H, 4 * D), 0.1),
            W2=n((H, 4 * D, D), 0.2),
            b2=n((H, D), 0.1),
        )
    return x, p


def call(inner, x, p, **kw):
    op = ttt_linear if inner == "linear" else ttt_mlp
    return op(x["q"], x["k"], x["v"], x["eta"], **p, **kw)


def sliced(x, a, b):
    return {k: v[:, a:b] for k, v in x.items()}


@functools.cache
def whole_37(inner):
    """The one call every split of `test_streaming` is compared with (compiled once)."""
    x, p = inputs(inner, 37)
    return run_fast(lambda x: call(inner, x, p, mini_batch_size=8), x)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("split", [8, 16, 24])
def test_streaming(inner, split):
    x, p = inputs(inner, 37)
    o, s = whole_37(inner)
    o1, s1 = run_fast(lambda x: call(inner, x, p, mini_batch_size=8), sliced(x, 0, split))
    o2, s2 = run_fast(
        lambda x, s: call(inner, x, p, mini_batch_size=8, initial_state=s),
        sliced(x, split, 37),
        s1,
    )
    assert rel_err(jnp.concatenate([o1, o2], 1), o) <= OP_TOL
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s), strict=True):
        assert rel_err(a, b) <= OP_TOL


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_partial_tail_reads_but_does_not_update(inner):
    x, p = inputs(inner, 40)

    def run(t):
        return run_fast(lambda x: call(inner, x, p, mini_batch_size=8), sliced(x, 0, t))

    o_full, s_full = run(32)
    o_long, s_long = run(40)  # 5 chunks
    o_part, s_part = run(35)  # 4 chunks + 3 tokens
    for a, b in zip(jax.tree.leaves(s_part), jax.tree.leaves(s_full), strict=True):
        assert jnp.array_equal(a, b)
    # Outputs of the partial chunk equal those of the same positions in the longer sequence.
    assert rel_err(o_part, o_long[:, :35]) <= OP_TOL
    assert rel_err(o_part[:, :32], o_full) <= OP_TOL


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_dual_equals_primal(inner):
    x, p = inputs(inner, 29, seed=1)
    primal = ttt_linear_primal if inner == "linear" else ttt_mlp_primal

    def loss(fn, x, p):
        o, s = fn(x["q"], x["k"], x["v"], x["eta"], **p, mini_batch_size=8)
        return jnp.sum(jnp.sin(o)) + sum(jnp.sum(a) for a in jax.tree.leaves(s))

    dual = ttt_linear if inner == "linear" else ttt_mlp
    g_dual = run_fast(jax.grad(lambda x, p: loss(dual, x, p), argnums=(0, 1)), x, p)
    g_primal = run_fast(jax.grad(lambda x, p: loss(primal, x, p), argnums=(0, 1)), x, p)
    for a, b in zip(jax.tree.leaves(g_dual), jax.tree.leaves(g_primal), strict=True):
        assert rel_err(a, b) <= OP_TOL


KNOBS = [
    dict(checkpoint_group=1),
    dict(checkpoint_group=3),
    dict(checkpoint_group=4, remat_policy="dots"),
    dict(checkpoint_group=2, remat_policy="save_names:ttt_grad,ttt_z"),
    dict(unroll=2),
]


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_gradients_identical_for_every_knob(inner):
    x, p = inputs(inner, 44, seed=2)

    def grads(**kw):
        def loss(x, p):
            o, s = call(inner, x, p, mini_batch_size=4, **kw)
            return jnp.sum(o * o) + jnp.sum(s.W1)

        return run_fast(jax.grad(loss, argnums=(0, 1)), x, p)

    ref = jax.tree.leaves(grads())
    for kw in KNOBS:
        for a, b in zip(jax.tree.leaves(grads(**kw)), ref, strict=True):
            assert rel_err(a, b) <= 1e-6, kw


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_bf16_inputs_keep_fp32_state(inner):
    x, p = inputs(inner, 32, dtype=jnp.bfloat16)
    o, s = call(inner, x, p, mini_batch_size=8)
    assert o.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s))
    x32 = {k: v.astype(jnp.float32) for k, v in x.items()}
    o32, s32 = call(inner, x32, p, mini_batch_size=8)
    # bf16 matmul operands, fp32 accumulation: close to the fp32 run at bf16 resolution.
    assert rel_err(o.astype(jnp.float32), o32) <= 2e-2
    assert rel_err(s.W1, s32.W1) <= 2e-2


def test_state_dtype_argument():
    x, p = inputs("linear", 16)
    _, s = call("linear", x, p, mini_batch_size=8, state_dtype=jnp.bfloat16)
    assert s.W1.dtype == jnp.bfloat16


def test_default_token_scale_is_one_over_position():
    x, p = inputs("linear", 16)
    o1, _ = call("linear", x, p, mini_batch_size=8)
    o2, _ = call("linear", x, p, mini_batch_size=8, token_scale=1.0 / jnp.arange(1.0, 9.0))
    assert jnp.array_equal(o1, o2)


def test_jit_and_vmap_compose():
    x, p = inputs("linear", 16)
    f = jax.jit(lambda x: call("linear", x, p, mini_batch_size=8)[0])
    assert rel_err(f(x), call("linear", x, p, mini_batch_size=8)[0]) <= 1e-6


BAD = [
    (
        dict(q=jnp.zeros((2, 16, 3))),
        "q must have rank 4 with shape (B, T, H, D), got shape (2, 16, 3)",
    ),
    (dict(k=jnp.zeros((2, 16, 3, 4))), "k has shape (2, 16, 3, 4) but q gives D=8"),
    (dict(v=jnp.zeros((2, 15, 3, 8))), "v has shape (2, 15, 3, 8) but q gives T=16"),
    (dict(eta=jnp.zeros((2, 16, 2))), "eta has shape (2, 16, 2) but q gives H=3"),
    (dict(W1=jnp.zeros((4, 8, 8))), "W1 has shape (4, 8, 8) but q gives H=3"),
    (dict(ln_scale=jnp.zeros((3, 7))), "ln_scale has shape (3, 7) but q gives D=8"),
    (dict(mini_batch_size=0), "mini_batch_size must be a positive int, got 0"),
    (dict(mini_batch_size=4.0), "mini_batch_size must be a positive int, got 4.0"),
    (dict(token_scale=jnp.ones(4)), "token_scale has shape (4,) but expected (8,)"),
    (dict(q=jnp.zeros((2, 16, 3, 8), jnp.int32)), "q must have a floating dtype, got int32"),
    (dict(k=jnp.zeros((2, 16, 3, 8), jnp.bfloat16)), "q, k, v must share a dtype"),
    (
        dict(initial_state=TTTLinearState(W1=jnp.zeros((3, 3, 8, 8)), b1=jnp.zeros((3, 3, 8)))),
        "initial_state.W1 has shape (3, 3, 8, 8) but q gives B=2",
    ),
    (dict(checkpoint_group=-1), "checkpoint_group must be a positive int, got -1"),
    (dict(checkpoint_group=2, remat_policy="everything"), "is not a known policy"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_names_the_argument(override, message):
    x, p = inputs("linear", 16)
    args = {**x, **p, "mini_batch_size": 8, **override}
    q, k, v, eta = (args.pop(n) for n in ("q", "k", "v", "eta"))
    with pytest.raises(ValueError) as info:
        ttt_linear(q, k, v, eta, **args)
    assert message in str(info.value)
