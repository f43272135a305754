"""TTT-Linear / TTT-MLP with packed documents (`segment_ids`): each document of a packed row
gets the outputs (and the last one the final state) it gets alone, in fp32 and float64; one
document is the unsegmented path bit for bit; the primal twin agrees; bad ids are ValueErrors.

Gradients are in `test_ttt_segments_grads.py`, the layer in `test_ttt_segments_layer.py`. The
packed calls compile with the fast CPU options (`tests.memory_helpers.run_fast`); the bit-for-bit
comparison keeps the default pipeline, the one whose bits it claims.
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
    T,
    alone,
    docs,
    make_inputs,
    run,
    segment_ids,
    x64,
)
from ttt_jax.testing import rel_err


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
        o, s = run_fast(lambda x, p, s0: run(inner, x, p, s0, dtype=dtype, **knobs), x, p, s0)
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
    o, s = run_fast(lambda x, p, s0: run(inner, x, p, s0, segment_ids=seg), x, p, s0)
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
    o, s = run_fast(lambda x, p, s0: run(inner, x, p, s0, segment_ids=seg), x, p, s0)
    o_p, s_p = run_fast(
        lambda x, p, s0: run(inner, x, p, s0, primal=True, segment_ids=seg), x, p, s0
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
