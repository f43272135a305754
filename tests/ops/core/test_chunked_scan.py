"""The shared chunked scan equals `lax.scan` (values and gradients) for every memory knob."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from ttt_jax.ops import chunked_scan
from ttt_jax.ops.core.remat import POLICY_NAMES, resolve_policy
from ttt_jax.testing import rel_err


def step(carry, x):
    w, s = carry
    h = jnp.tanh(x @ w)
    w = w + 0.1 * jnp.outer(x, h)
    return (w, s + h.sum()), h * s


def run(knobs, w, xs):
    (w, s), ys = chunked_scan(step, (w, jnp.float32(1.0)), xs, **knobs)
    return jnp.sum(w * w) + s + jnp.sum(jnp.sin(ys))


KNOBS = [
    {},
    {"checkpoint_group": 1},
    {"checkpoint_group": 3},  # 10 chunks: 3 full groups and a short one
    {"checkpoint_group": 10},
    {"checkpoint_group": 50},  # bigger than the scan
    {"checkpoint_group": 4, "remat_policy": "dots"},
    {"checkpoint_group": 4, "remat_policy": "dots_no_batch"},
    {"checkpoint_group": 2, "remat_policy": "none"},
    {"checkpoint_group": 2, "remat_policy": "full"},
    {"unroll": 2},
    {"checkpoint_group": 3, "unroll": 2},
]


@pytest.mark.parametrize("knobs", KNOBS, ids=str)
def test_matches_lax_scan(knobs):
    w = jax.random.normal(jax.random.PRNGKey(0), (5, 5)) * 0.3
    xs = jax.random.normal(jax.random.PRNGKey(1), (10, 5))
    (w_ref, s_ref), ys_ref = lax.scan(step, (w, jnp.float32(1.0)), xs)
    (w_out, s_out), ys = chunked_scan(step, (w, jnp.float32(1.0)), xs, **knobs)
    assert rel_err(w_out, w_ref) <= 1e-6 and rel_err(ys, ys_ref) <= 1e-6
    g_ref = jax.grad(lambda w, xs: run({}, w, xs), argnums=(0, 1))(w, xs)
    g = jax.jit(jax.grad(lambda w, xs: run(knobs, w, xs), argnums=(0, 1)))(w, xs)
    for a, b in zip(g, g_ref, strict=True):
        assert rel_err(a, b) <= 1e-6


def test_empty_scan():
    carry, ys = chunked_scan(
        step, (jnp.eye(3), jnp.float32(0)), jnp.zeros((0, 3)), checkpoint_group=2
    )
    assert ys.shape == (0, 3)


@pytest.mark.parametrize(
    "knobs,match",
    [
        ({"checkpoint_group": 0}, "checkpoint_group must be a positive int, got 0"),
        ({"checkpoint_group": 2.0}, "checkpoint_group must be a positive int"),
        ({"remat_policy": "dots"}, "needs checkpoint_group"),
        ({"checkpoint_group": 2, "remat_policy": "fancy"}, "valid: none, full, dots"),
        ({"checkpoint_group": 2, "remat_policy": "save_names:"}, "names no values"),
        ({"unroll": 0}, "unroll must be a positive int"),
    ],
)
def test_bad_knobs(knobs, match):
    with pytest.raises(ValueError, match=match):
        chunked_scan(step, (jnp.eye(3), jnp.float32(0)), jnp.zeros((4, 3)), **knobs)


def test_policy_names_resolve():
    for name in POLICY_NAMES:
        name = name.replace("<a,b>", "ttt_grad,ttt_z")
        assert resolve_policy(name) is not None
