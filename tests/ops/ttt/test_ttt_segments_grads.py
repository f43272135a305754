"""Gradients of TTT-Linear / TTT-MLP with packed documents: the gradient of a packed row is the
sum of its documents' gradients (weights, norms, token scale), token by token for q, k, v, eta,
and the initial state's is the first document's; the memory knobs do not change it; a row of
one document matches the unsegmented path to rounding.

The loss is a fixed random projection of the outputs and of the final state (the last
document's), so every output and every state field carries a cotangent. Every gradient is
compiled once with the fast CPU options (`tests.memory_helpers.run_fast`): compiling is most of
the time these tests take.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.memory_helpers import run_fast
from tests.ops.ttt.segments_helpers import (
    LAYOUTS,
    TOL,
    alone,
    docs,
    make_inputs,
    run,
    segment_ids,
    x64,
)
from ttt_jax.testing import rel_err

T = 27


def cotangents(inner, dtype):
    x, p, s0 = make_inputs(inner, len(LAYOUTS), T, dtype, seed=7, initial=True)
    return x["q"], {n: s0[n] for n in s0}


def packed_loss(inner, dtype, group, policy, x, p, s0, ct_o, ct_s):
    o, s = run(
        inner,
        x,
        p,
        s0,
        dtype=dtype,
        segment_ids=segment_ids(LAYOUTS),
        checkpoint_group=group,
        remat_policy=policy,
    )
    return jnp.sum(o * ct_o) + sum(jnp.sum(getattr(s, n) * c) for n, c in ct_s.items())


def alone_loss(inner, dtype, x, p, s0, ct_o, ct_s):
    """The same loss with every document by itself (`segments_helpers.alone`: no document
    sees another), so its gradient is the documents' gradients summed."""
    outs, states = alone(inner, x, p, s0, LAYOUTS, dtype)
    total = 0.0
    for row, lens in enumerate(LAYOUTS):
        for (a, b), o in zip(docs(lens), outs[row], strict=True):
            total = total + jnp.sum(o * ct_o[row : row + 1, a:b])
        s = states[row]
        total = total + sum(jnp.sum(getattr(s, f) * c[row : row + 1]) for f, c in ct_s.items())
    return total


@functools.cache
def grads(inner, dtype, initial, group, policy, how):
    with x64(dtype):
        x, p, s0 = make_inputs(inner, len(LAYOUTS), T, dtype, initial=initial)
        ct_o, ct_s = cotangents(inner, dtype)
        if how == "packed":
            loss = functools.partial(packed_loss, inner, dtype, group, policy)
        else:
            loss = functools.partial(alone_loss, inner, dtype)
        argnums = (0, 1, 2) if initial else (0, 1)
        g = run_fast(jax.grad(loss, argnums=argnums), x, p, s0, ct_o, ct_s)
        return jax.tree.map(np.asarray, g)


def per_document_errors(g_packed, g_alone):
    """Worst error of q/k/v/eta gradients per document, and of each weight's gradient."""
    token_err = 0.0
    for name in ("q", "k", "v", "eta"):
        for row, lens in enumerate(LAYOUTS):
            for a, b in docs(lens):
                err = rel_err(g_packed[0][name][row, a:b], g_alone[0][name][row, a:b])
                token_err = max(token_err, err)
    weight_err = {n: rel_err(g_packed[1][n], g_alone[1][n]) for n in g_alone[1]}
    if len(g_alone) == 3:
        weight_err |= {f"s0.{n}": rel_err(g_packed[2][n], g_alone[2][n]) for n in g_alone[2]}
    return token_err, weight_err


@pytest.mark.parametrize(
    "dtype, initial, group",
    [
        (np.float32, True, 2),
        (np.float32, False, None),
        (np.float64, True, None),
    ],
)
@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_packed_gradient_is_the_sum_of_the_documents(inner, dtype, initial, group):
    g_packed = grads(inner, dtype, initial, group, None, "packed")
    g_alone = grads(inner, dtype, initial, None, None, "alone")
    token_err, weight_err = per_document_errors(g_packed, g_alone)
    print(
        f"{inner} {dtype.__name__}: tokens {token_err:.2e}",
        {n: f"{e:.1e}" for n, e in weight_err.items()},
    )
    assert token_err <= TOL[dtype]
    assert max(weight_err.values()) <= TOL[dtype]
    if not initial:
        return
    # The initial state reaches the first document only; rows whose first document has no
    # complete mini-batch still pass it on to their tail reads.
    assert all(np.any(g != 0) for g in jax.tree.leaves(g_packed[2]))


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_memory_knobs_leave_the_gradient(inner):
    base = grads(inner, np.float32, True, 2, None, "packed")
    for group, policy in ((None, None), (1, "save_names:ttt_z,ttt_grad")):
        g = grads(inner, np.float32, True, group, policy, "packed")
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(base), strict=True):
            assert rel_err(a, b) <= 1e-6, (group, policy)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_one_document_gradient_matches_the_unsegmented_path(inner):
    # Equal to rounding, not bit for bit: the parameters' cotangents are summed in another
    # order through the segmented path's extra (all-zero) reads.
    x, p, s0 = make_inputs(inner, 2, T, np.float32, initial=True)

    def loss(x, p, s0, seg):
        o, s = run(inner, x, p, s0, segment_ids=seg, checkpoint_group=2)
        return jnp.sum(o * jnp.sin(o)) + sum(jnp.sum(w**2) for w in jax.tree.leaves(s))

    g_plain = run_fast(jax.grad(lambda *a: loss(*a, None), argnums=(0, 1, 2)), x, p, s0)
    one_doc = jnp.zeros((2, T), jnp.int32)
    g_one = run_fast(jax.grad(lambda *a: loss(*a, one_doc), argnums=(0, 1, 2)), x, p, s0)
    for a, b in zip(jax.tree.leaves(g_one), jax.tree.leaves(g_plain), strict=True):
        assert rel_err(a, b) <= 1e-6
