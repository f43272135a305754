"""Shared by the packed-documents tests of TTT-Linear / TTT-MLP (`test_ttt_segments.py`,
`test_ttt_segments_grads.py`): the document layouts, random inputs, the op call, and every
document run alone (the reference a packed row is compared with)."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.ops import (
    TTTLinearState,
    TTTMLPState,
    ttt_linear,
    ttt_linear_primal,
    ttt_mlp,
    ttt_mlp_primal,
)

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
