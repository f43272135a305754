"""TTT-Linear / TTT-MLP with packed documents (`segment_ids`): each document of a packed row
gets the outputs (and the last one the final state) it gets alone, in fp32 and float64; one
document is the unsegmented path bit for bit; the primal twin agrees; bad ids are ValueErrors.

Gradients are in `test_ttt_segments_grads.py`, the layer in `test_ttt_segments_layer.py`.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops import (
    TTTLinearState,
    TTTMLPState,
    ttt_linear,
    ttt_linear_primal,
    ttt_mlp,
    ttt_mlp_primal,
)
from ttt_jax.testing import rel_err

H, D, C = 2, 8, 4
# Document lengths per row (T = 27, C = 4, so N = 6 slots). Row 0: a first document shorter
# than C, one of exactly C, 2C + 1, a run of short ones, C + 3. Row 1: a first document of
# 2C + 2, short ones, 2C + 3. Row 2: documents of exactly C, the last one short (the final
# state is the reset state). Row 3: 27 one-token documents.
LAYOUTS = (
    (3, 4, 9, 1, 1, 2, 7),
    (10, 2, 2, 2, 11),
    (4, 4, 4, 4, 4, 4, 3),
    (1,) * 27,
)
T = 27
TOL = {np.float32: 1e-5, np.float64: 1e-12}
OPS = {"linear": ttt_linear, "mlp": ttt_mlp}
PRIMALS = {"linear": ttt_linear_primal, "mlp": ttt_mlp_primal}


def x64(dtype):
    return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


def segment_ids(layouts):
    return jnp.asarray(np.stack([np.repeat(np.arange(len(ls)), ls) for ls in layouts]), jnp.int32)


def make_inputs(inner, b, t, dtype, seed=0, initial=False):
    """Random op inputs, weights and (optionally) an initial state, in `dtype`."""
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 16))

    def n(shape, s=1.0):
        return (s * jax.random.normal(next(ks), shape, jnp.float32)).astype(dtype)

    x = dict(q=n((b, t, H, D)), k=n((b, t, H, D)), v=n((b, t, H, D)))
    x["eta"] = (0.2 * jax.nn.sigmoid(n((b, t, H)))).astype(dtype)
    p = dict(ln_scale=1 + n((H, D), 0.1), ln_bias=n((H, D), 0.1))
    f = D if inner == "linear" else 4 * D
    p |= dict(W1=n((H, D, f), 0.3), b1=n((H, f), 0.1))
    if inner == "mlp":
        p |= dict(W2=n((H, f, D), 0.3), b2=n((H, D), 0.1))
    p["token_scale"] = (
        1.0 / jnp.arange(1, C + 1, dtype=float) + n((C,), 0.05).astype(float)
    ).astype(dtype)
    s0 = None
    if initial:
        fields = ("W1", "b1") if inner == "linear" else ("W1", "b1", "W2", "b2")
        s0 = {f_: p[f_][None] + n((b, *p[f_].shape), 0.05) for f_ in fields}
    return x, p, s0


def state_of(inner, s0):
    return None if s0 is None else (TTTLinearState if inner == "linear" else TTTMLPState)(**s0)


def run(inner, x, p, s0=None, *, primal=False, dtype=np.float32, **kw):
    op = (PRIMALS if primal else OPS)[inner]
    return op(
        x["q"],
        x["k"],
        x["v"],
        x["eta"],
        **p,
        mini_batch_size=C,
        initial_state=state_of(inner, s0),
        state_dtype=dtype,
        **kw,
    )


def docs(lens):
    starts = np.cumsum((0, *lens[:-1]))
    return [(int(a), int(a + n)) for a, n in zip(starts, lens, strict=True)]


@functools.partial(jax.jit, static_argnums=(0, 4))
def run_jit(inner, x, p, s0, dtype):
    return run(inner, x, p, s0, dtype=dtype)


def alone(inner, x, p, s0, layouts, dtype):
    """Every document of every row by itself, the first of a row from `s0` (all others from
    the weights, passed as an explicit state so that both cases share one compilation).

    Outputs come from one call holding every document as a sample, zero-padded at the end:
    an output depends on no later token, so padding after a document leaves its outputs as they
    are alone. Final states come from each row's last document run at its own length.

    Returns:
      `(outs, states)`: `outs[row][i]` the i-th document's outputs `[1, L, H, D]`, `states[row]`
      the row's last document's final state (dict of `[1, ...]`).
    """
    fields = ("W1", "b1") if inner == "linear" else ("W1", "b1", "W2", "b2")

    def start_of(row, i):
        if s0 is not None and i == 0:
            return {f: s0[f][row : row + 1] for f in fields}
        return {f: p[f][None] for f in fields}

    spans = [
        (row, i, a, b) for row, lens in enumerate(layouts) for i, (a, b) in enumerate(docs(lens))
    ]
    width = max(b - a for _, _, a, b in spans)

    def padded(v, row, a, b):
        return jnp.pad(
            v[row : row + 1, a:b], [(0, 0), (0, width - b + a)] + [(0, 0)] * (v.ndim - 2)
        )

    xd = {n: jnp.concatenate([padded(v, r, a, b) for r, _, a, b in spans]) for n, v in x.items()}
    sd = {f: jnp.concatenate([start_of(r, i)[f] for r, i, _, _ in spans]) for f in fields}
    o, _ = run_jit(inner, xd, p, sd, dtype)
    outs = [[] for _ in layouts]
    for j, (row, _, a, b) in enumerate(spans):
        outs[row].append(o[j : j + 1, : b - a])
    states = []
    for row, lens in enumerate(layouts):
        a, b = docs(lens)[-1]
        xl = {n: v[row : row + 1, a:b] for n, v in x.items()}
        _, s = run_jit(inner, xl, p, start_of(row, len(lens) - 1), dtype)
        states.append(s)
    return outs, states


@functools.cache
def reference(inner, dtype, initial):
    with x64(dtype):
        x, p, s0 = make_inputs(inner, len(LAYOUTS), T, dtype, initial=initial)
        return x, p, s0, alone(inner, x, p, s0, LAYOUTS, dtype)


def packed_vs_alone(inner, dtype, initial, group):
    """Worst per-document output error and worst final-state error over LAYOUTS."""
    with x64(dtype):
        x, p, s0, (outs, states) = reference(inner, dtype, initial)
        knobs = dict(checkpoint_group=group, segment_ids=segment_ids(LAYOUTS))
        o, s = jax.jit(lambda x, p, s0: run(inner, x, p, s0, dtype=dtype, **knobs))(x, p, s0)
        assert o.dtype == dtype
        out_err = state_err = 0.0
        for row, lens in enumerate(LAYOUTS):
            for (a, b), o_ref in zip(docs(lens), outs[row], strict=True):
                out_err = max(out_err, rel_err(o[row : row + 1, a:b], o_ref))
            for got, want in zip(jax.tree.leaves(s), jax.tree.leaves(states[row]), strict=True):
                state_err = max(state_err, rel_err(got[row : row + 1], want))
    return out_err, state_err


@pytest.mark.parametrize(
    "dtype, initial, group",
    [
        (np.float32, False, None),
        (np.float32, True, None),
        (np.float32, False, 2),
        (np.float32, True, 2),
        (np.float64, False, None),
        (np.float64, True, 2),
    ],
)
@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_packed_row_equals_documents_alone(inner, dtype, initial, group):
    out_err, state_err = packed_vs_alone(inner, dtype, initial, group)
    print(f"{inner} {dtype.__name__} initial={initial} G={group}: {out_err:.2e} {state_err:.2e}")
    assert out_err <= TOL[dtype] and state_err <= TOL[dtype]


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_fewer_tokens_than_a_mini_batch(inner):
    # T < C: no slot at all; the first document reads the initial state, the second the reset.
    x, p, s0 = make_inputs(inner, 1, 3, np.float32, initial=True)
    seg = jnp.asarray([[5, 7, 7]])
    o, s = jax.jit(lambda x, p, s0: run(inner, x, p, s0, segment_ids=seg))(x, p, s0)
    outs, states = alone(inner, x, p, s0, [(1, 2)], np.float32)
    assert rel_err(o, jnp.concatenate(outs[0], 1)) <= 1e-5
    for got, want in zip(jax.tree.leaves(s), jax.tree.leaves(states[0]), strict=True):
        assert rel_err(got, want) <= 1e-5


# (T, initial state, checkpoint group): C divides T or not, with and without each.
@pytest.mark.parametrize("t, initial, group", [(24, False, None), (27, True, 2)])
@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_one_document_is_the_unsegmented_path_bit_for_bit(inner, t, initial, group):
    x, p, s0 = make_inputs(inner, 2, t, np.float32, initial=initial)
    one_doc = jnp.full((2, t), 3, jnp.int16)
    plain = jax.jit(lambda x, p, s0: run(inner, x, p, s0, checkpoint_group=group))
    same = jax.jit(
        lambda x, p, s0: run(inner, x, p, s0, checkpoint_group=group, segment_ids=one_doc)
    )
    for a, b in zip(jax.tree.leaves(plain(x, p, s0)), jax.tree.leaves(same(x, p, s0)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_primal_twin_with_segments(inner):
    x, p, s0 = make_inputs(inner, len(LAYOUTS), T, np.float32, initial=True)
    seg = segment_ids(LAYOUTS)
    o, s = jax.jit(lambda x, p, s0: run(inner, x, p, s0, segment_ids=seg))(x, p, s0)
    o_p, s_p = jax.jit(lambda x, p, s0: run(inner, x, p, s0, primal=True, segment_ids=seg))(
        x, p, s0
    )
    assert rel_err(o_p, o) <= 1e-5
    for a, b in zip(jax.tree.leaves(s_p), jax.tree.leaves(s), strict=True):
        assert rel_err(a, b) <= 1e-5


def bad_segment_ids():
    yield jnp.zeros((2, T + 1), jnp.int32), "segment_ids"
    yield jnp.zeros((2,), jnp.int32), "segment_ids must have rank 2"
    yield jnp.zeros((3, T), jnp.int32), "segment_ids"
    yield jnp.zeros((2, T), jnp.float32), "segment_ids must have an integer dtype"
    yield jnp.zeros((2, T), bool), "segment_ids must have an integer dtype"


@pytest.mark.parametrize("primal", [False, True])
@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_bad_segment_ids_name_the_argument(inner, primal):
    x, p, _ = make_inputs(inner, 2, T, np.float32)
    for seg, message in bad_segment_ids():
        with pytest.raises(ValueError, match=message):
            run(inner, x, p, primal=primal, segment_ids=seg)


def test_kernel_impl_has_no_segments_yet():
    # A call the kernel supports (C = 16, D = 16, fp32), so that segment_ids is the only reason
    # it refuses; impl="auto" takes the XLA path instead.
    z = jnp.zeros((1, 32, 1, 16))
    p = dict(W1=jnp.zeros((1, 16, 16)), b1=jnp.zeros((1, 16)), ln_scale=jnp.ones((1, 16)))
    p |= dict(ln_bias=jnp.zeros((1, 16)), mini_batch_size=16)
    seg = jnp.repeat(jnp.arange(2), 16)[None]
    with pytest.raises(ValueError, match="segment_ids is not supported by the kernel"):
        ttt_linear(z, z, z, z[..., 0], **p, impl="pallas_interpret", segment_ids=seg)
    o, _ = ttt_linear(z, z, z, z[..., 0], **p, impl="auto", segment_ids=seg)
    assert o.shape == z.shape
