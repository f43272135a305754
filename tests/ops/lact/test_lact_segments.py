"""LaCT with packed documents (`segment_ids`, SPEC 2, issue 18): a packed row gives each
document exactly what it gets alone: outputs, the last document's final state, and gradients
(tokens of each document; slow weights summed over the documents that start from them; the
initial state through the first document only).

Rows (C=4, T=25) chosen to reach every path of `ttt_jax/ops/lact/packed.py`:
- row 0 `[3, 9, 4, 3, 6]`: a first document shorter than C (reads the initial state), a tail
  read in a reset slot, a document of exactly one chunk (no tail), a later short document
  (reads the slow weights), and the last tail read in a padding slot;
- row 1 `[9, 13, 3]`: a padding slot holding a tail, and a short last document (the final state
  is the slow weights with zero momentum);
- row 2 `[12, 13]`: every slot used, the last tail read after the last slot.
The rows differ in where their slots are padding, so the per-row state selects are exercised.

The documents alone are run with the unsegmented op, batched by length (every document after a
row's first starts from the slow weights with zero momentum, passed as its initial state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops import LaCTState, lact_swiglu
from ttt_jax.testing import OP_TOL, rel_err

H, D, DH, C = 2, 4, 6, 4
ROWS = ([3, 9, 4, 3, 6], [9, 13, 3], [12, 13])
T = 25
TOKENS = ("q", "k", "v", "lr0", "lr1", "lr2", "momentum")
FIELDS = ("w0", "w1", "w2", "m0", "m1", "m2")


def make_inputs(dtype, seed=0):
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 32))
    n = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape, dtype)  # noqa: E731
    b = len(ROWS)
    tokens = {t: n((b, T, H, D)) for t in ("q", "k", "v")}
    tokens |= {f"lr{j}": 0.2 * jax.nn.sigmoid(n((b, T, H))) for j in range(3)}
    tokens["momentum"] = jax.nn.sigmoid(n((b, T, H)))
    w = {"w0": n((H, DH, D), 0.5), "w1": n((H, D, DH), 0.5), "w2": n((H, DH, D), 0.5)}
    shapes = {"w0": (DH, D), "w1": (D, DH), "w2": (DH, D)}
    state = {f: n((b, H, *shapes["w" + f[1]]), 0.3) for f in FIELDS}
    probes = {"o": n((b, T, H, D)), **{f: n((b, H, *shapes["w" + f[1]])) for f in FIELDS}}
    ids = np.concatenate([np.repeat(np.arange(len(r)), r)[None] for r in ROWS])
    return tokens, w, state, probes, jnp.asarray(ids, jnp.int32)


def packed_grads(tokens, w, state, probes, ids, **knobs):
    def loss(tokens, w, state):
        o, s = lact_swiglu(
            *(tokens[t] for t in TOKENS[:6]),
            momentum=tokens["momentum"],
            **w,
            chunk_size=C,
            segment_ids=ids,
            initial_state=LaCTState(**state),
            **knobs,
        )
        probe = sum(jnp.sum(getattr(s, f) * probes[f]) for f in FIELDS)
        return jnp.sum(o * probes["o"]) + probe, (o, s)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, (o, s)), grads = fn(tokens, w, state)
    return o, s, grads


def alone_grads(tokens, w, state, probes, **knobs):
    """The same loss with every document run alone (module docstring)."""
    docs = []  # (row, start, length, first, last)
    for r, lens in enumerate(ROWS):
        starts = np.cumsum([0, *lens[:-1]])
        docs += [
            (r, s, n, i == 0, i == len(lens) - 1)
            for i, (s, n) in enumerate(zip(starts, lens, strict=True))
        ]
    by_len = {}
    for doc in docs:
        by_len.setdefault(doc[2], []).append(doc)

    def loss(tokens, w, state):
        total, outs, finals = 0.0, {}, {}
        for n, group in by_len.items():
            rows = np.array([d[0] for d in group])
            first = jnp.array([d[3] for d in group])

            def take(x, n=n, group=group):
                return jnp.stack([x[d[0], d[1] : d[1] + n] for d in group])

            start = {}
            for f in FIELDS:
                slow = w["w" + f[1]] if f[0] == "w" else jnp.zeros_like(w["w" + f[1]])
                start[f] = jnp.where(first[:, None, None, None], state[f][rows], slow[None])
            o, s = lact_swiglu(
                *(take(tokens[t]) for t in TOKENS[:6]),
                momentum=take(tokens["momentum"]),
                **w,
                chunk_size=C,
                initial_state=LaCTState(**start),
                **knobs,
            )
            total = total + jnp.sum(o * take(probes["o"]))
            for i, d in enumerate(group):
                outs[(d[0], d[1])] = o[i]
                if d[4]:
                    finals[d[0]] = {f: getattr(s, f)[i] for f in FIELDS}
                    total = total + sum(jnp.sum(finals[d[0]][f] * probes[f][d[0]]) for f in FIELDS)
        o = jnp.stack(
            [
                jnp.concatenate([outs[k] for k in sorted(outs) if k[0] == r])
                for r in range(len(ROWS))
            ]
        )
        s = {f: jnp.stack([finals[r][f] for r in range(len(ROWS))]) for f in FIELDS}
        return total, (o, s)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, (o, s)), grads = fn(tokens, w, state)
    return o, s, grads


def assert_equal_alone(packed, alone, tol):
    (o, s, (gt, gw, gs)), (o_a, s_a, (gt_a, gw_a, gs_a)) = packed, alone
    errors = {"o": rel_err(o, o_a)}
    errors |= {f"state.{f}": rel_err(getattr(s, f), s_a[f]) for f in FIELDS}
    errors |= {f"d{t}": rel_err(gt[t], gt_a[t]) for t in TOKENS}
    errors |= {f"d{f}": rel_err(gw[f], gw_a[f]) for f in gw}
    errors |= {f"d_initial.{f}": rel_err(gs[f], gs_a[f]) for f in FIELDS}
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, bad


KNOBS = [
    dict(backward="custom", checkpoint_group=2),
    dict(backward="autodiff"),
    dict(backward="custom"),
    dict(backward="autodiff", checkpoint_group=4),
]


def check_float64(muon: bool, knobs: list[dict]) -> None:
    with jax.enable_x64(True):
        args = make_inputs(jnp.float64)
        common = dict(use_muon=muon, state_dtype=jnp.float64)
        alone = alone_grads(*args[:4], backward="autodiff", **common)
        for k in knobs:
            assert_equal_alone(packed_grads(*args, **k, **common), alone, 1e-12)


def test_packed_row_equals_documents_alone_float64():
    """Both backwards (the custom one with checkpoint groups rebuilding states)."""
    check_float64(False, KNOBS[:2])


@pytest.mark.slow
@pytest.mark.parametrize("muon", [False, True])
def test_packed_row_equals_documents_alone_float64_every_knob(muon):
    check_float64(muon, KNOBS if muon else KNOBS[2:])


def test_packed_row_equals_documents_alone_fp32():
    args = make_inputs(jnp.float32, seed=1)
    alone = alone_grads(*args[:4])
    assert_equal_alone(packed_grads(*args), alone, OP_TOL)


def test_one_document_is_the_unsegmented_op():
    with jax.enable_x64(True):
        tokens, w, state, probes, _ = make_inputs(jnp.float64, seed=2)
        one_doc = jnp.zeros((len(ROWS), T), jnp.int32)

        def run(ids):
            return packed_grads(tokens, w, state, probes, ids, state_dtype=jnp.float64)

        packed, dense = run(one_doc), run(None)
        for a, b in zip(jax.tree.leaves(packed), jax.tree.leaves(dense), strict=True):
            assert rel_err(a, b) <= 1e-13


def test_bad_segment_ids_are_value_errors():
    tokens, w, _, _, ids = make_inputs(jnp.float32)
    args = [tokens[t] for t in TOKENS[:6]]
    with pytest.raises(ValueError, match="segment_ids"):
        lact_swiglu(*args, **w, chunk_size=C, segment_ids=ids[:, :-1])
    with pytest.raises(ValueError, match="segment_ids must have an integer dtype"):
        lact_swiglu(*args, **w, chunk_size=C, segment_ids=ids.astype(jnp.float32))
