"""In-Place TTT op (SPEC 3.3), forward: values and final states against the plain
per-document, per-chunk reference for both prefixes and both backwards; documents packed with
`segment_ids` equal the documents run alone; streaming; padding; strict causality (with an
inclusive-prefix negative control); bf16 inputs keep an fp32 state. Gradients:
`test_inplace_grads.py`; bad arguments: `test_inplace_errors.py`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.inplace.inplace_helpers import (
    GRAD_KEYS,
    IMPLS,
    SEGMENTS,
    TAU,
    Bn,
    C,
    D,
    F,
    T,
    grads_of,
    make_inputs,
    ref_conv,
    reference,
    run_op,
    run_ref,
)
from ttt_jax.ops.inplace.op import inplace_ttt
from ttt_jax.testing import rel_err

# --- values


@pytest.mark.parametrize("conv_mode,k", [("centered", 5), ("causal_next", 2)])
@pytest.mark.parametrize("clip_tau", [None, TAU])
def test_forward_and_state_match_reference_for_every_implementation(conv_mode, k, clip_tau):
    inputs = make_inputs(k=k)
    o_ref, w_ref = run_ref(inputs, conv_mode=conv_mode, clip_tau=clip_tau)
    for prefix, backward in IMPLS:
        o, s = jax.jit(
            functools.partial(
                run_op, conv_mode=conv_mode, clip_tau=clip_tau, prefix=prefix, backward=backward
            )
        )(inputs)
        assert o.shape == (Bn, T, D) and o.dtype == jnp.float32
        assert s.w_down.shape == (Bn, D, F) and s.w_down.dtype == jnp.float32
        assert rel_err(o, o_ref) <= 1e-5, (prefix, backward)
        assert rel_err(s.w_down, w_ref) <= 1e-5, (prefix, backward)


def test_clipping_is_active_in_the_tests_and_changes_the_result():
    inputs = make_inputs()
    norms = []
    for b in range(Bn):
        for c0 in range(0, T - C + 1, C):
            v = ref_conv(inputs["target"][b, c0 : c0 + C], inputs["conv_kernel"], "centered")
            v = v @ inputs["w_target"]
            norms.append(float(jnp.linalg.norm(v.T @ inputs["z"][b, c0 : c0 + C])))
    assert min(norms) < TAU < max(norms), norms
    o_clip, _ = run_op(inputs, clip_tau=TAU)
    o_free, _ = run_op(inputs)
    assert rel_err(o_clip, o_free) > 1e-2


def test_packed_documents_equal_each_document_alone():
    inputs = make_inputs(seed=1)
    seg = jnp.asarray(SEGMENTS)
    o, s = jax.jit(functools.partial(run_op, segment_ids=seg))(inputs)
    for b in range(Bn):
        row = SEGMENTS[b]
        starts = [0] + [t for t in range(1, T) if row[t] != row[t - 1]]
        for i, (s0, s1) in enumerate(zip(starts, starts[1:] + [T], strict=True)):
            alone = {k: inputs[k][b : b + 1, s0:s1] for k in ("z", "target")}
            alone.update({k: inputs[k] for k in ("w_down", "w_target", "conv_kernel")})
            if i == 0:
                alone["w_init"] = inputs["w_init"][b : b + 1]
            o_doc, s_doc = run_op(alone)
            assert rel_err(o[b : b + 1, s0:s1], o_doc) <= 1e-5, (b, s0, s1)
        assert rel_err(s.w_down[b : b + 1], s_doc.w_down) <= 1e-5, b
    o_ref, w_ref = run_ref(inputs, segment_ids=SEGMENTS)
    for prefix, backward in IMPLS:
        o, s = jax.jit(
            functools.partial(run_op, segment_ids=seg, prefix=prefix, backward=backward)
        )(inputs)
        assert rel_err(o, o_ref) <= 1e-5 and rel_err(s.w_down, w_ref) <= 1e-5, (prefix, backward)


def split_call(inputs, t1, segment_ids=None):
    """The op on `[:t1]`, then on `[t1:]` from the first call's state."""
    seg = (None, None) if segment_ids is None else (segment_ids[:, :t1], segment_ids[:, t1:])
    first = dict(inputs, z=inputs["z"][:, :t1], target=inputs["target"][:, :t1])
    o1, s1 = run_op(first, segment_ids=seg[0])
    second = dict(inputs, z=inputs["z"][:, t1:], target=inputs["target"][:, t1:], w_init=s1.w_down)
    o2, s2 = run_op(second, segment_ids=seg[1])
    return jnp.concatenate([o1, o2], 1), s2


def test_streaming_split_on_chunk_boundaries_equals_one_call():
    inputs = make_inputs(seed=2)
    o_all, s_all = run_op(inputs)
    for t1 in (C, 3 * C):
        o, s = split_call(inputs, t1)
        assert rel_err(o, o_all) <= 1e-6 and rel_err(s.w_down, s_all.w_down) <= 1e-6, t1
    # Packed: row 0's document 1 spans [3, 12) with chunks [3, 7) and [7, 11), so t1 = 7 is a
    # chunk boundary of the document in progress; row 1's first document has one at t1 = 8.
    seg = jnp.asarray(SEGMENTS)
    o_all, s_all = run_op(inputs, segment_ids=seg)
    for b, t1 in ((0, 7), (1, 8)):
        row = {k: v[b : b + 1] if k in ("z", "target", "w_init") else v for k, v in inputs.items()}
        o, s = split_call(row, t1, seg[b : b + 1])
        assert rel_err(o, o_all[b : b + 1]) <= 1e-6, b
        assert rel_err(s.w_down, s_all.w_down[b : b + 1]) <= 1e-6, b


def test_padding_never_changes_outputs_or_state():
    inputs = make_inputs(seed=3, t=4 * C)
    o_long, _ = run_op(inputs)
    for t in (C - 1, 3 * C + 3):
        cut = dict(inputs, z=inputs["z"][:, :t], target=inputs["target"][:, :t])
        o, s = run_op(cut)
        assert rel_err(o, o_long[:, :t]) <= 1e-6
        if t < C:
            # No complete chunk: the state is the one the call started from (T = 0 is invalid).
            start = inputs["w_init"] if "w_init" in inputs else inputs["w_down"]
            np.testing.assert_array_equal(s.w_down, np.broadcast_to(start, s.w_down.shape))
            continue
        whole = dict(
            inputs, z=inputs["z"][:, : t // C * C], target=inputs["target"][:, : t // C * C]
        )
        _, s_whole = run_op(whole)
        np.testing.assert_array_equal(s.w_down, s_whole.w_down)


# --- causality


def forbidden_influence(fn, z, target):
    """Largest |d o_t / d input_s| over the pairs that strict causality forbids: s in the chunk
    of t or a later one, except t's own z. Also returns the largest allowed influence from
    earlier chunks, so the test cannot pass by computing nothing."""
    jz, jx = jax.jit(jax.jacrev(fn, argnums=(0, 1)))(z, target)
    jz, jx = jz[0, :, :, 0], jx[0, :, :, 0]  # [T, d, T, F], [T, d, T, d]
    t = z.shape[1]
    chunk = np.arange(t) // C
    later = chunk[None, :] >= chunk[:, None]  # [t, s]
    own = np.eye(t, dtype=bool)
    bad_z = np.abs(np.asarray(jz)).max(axis=(1, 3))[later & ~own]
    bad_x = np.abs(np.asarray(jx)).max(axis=(1, 3))[later]
    earlier = np.abs(np.asarray(jz)).max(axis=(1, 3))[~later]
    return max(bad_z.max(), bad_x.max()), earlier.max()


def test_no_output_sees_its_own_or_a_later_chunk_and_the_inclusive_prefix_would():
    ks = jax.random.split(jax.random.key(8), 5)
    t, d, f = 3 * C, 3, 4
    z = jax.random.normal(ks[0], (1, t, f))
    target = jax.random.normal(ks[1], (1, t, d))
    params = dict(
        w_down=jax.random.normal(ks[2], (d, f)),
        w_target=jax.random.normal(ks[3], (d, d)),
        conv_kernel=jax.random.normal(ks[4], (5, d)),
    )
    for prefix, backward in IMPLS:

        def op(z, target, pr=prefix, bw=backward):
            return inplace_ttt(z, target, eta=0.5, chunk_size=C, prefix=pr, backward=bw, **params)[
                0
            ]

        bad, allowed = forbidden_influence(op, z, target)
        assert bad == 0.0, (prefix, backward, bad)
        assert allowed > 1e-2, (prefix, backward, allowed)

    def inclusive(z, target):
        return reference(
            z,
            target,
            params["w_down"],
            params["w_target"],
            params["conv_kernel"],
            0.5,
            chunk_size=C,
            inclusive=True,
        )[0]

    bad, _ = forbidden_influence(inclusive, z, target)
    assert bad > 1e-2, bad


# --- precision


def test_bf16_inputs_keep_an_fp32_state_and_return_bf16():
    inputs = make_inputs(seed=10)
    o32, s32 = run_op(inputs)
    lo = {k: v.astype(jnp.bfloat16) for k, v in inputs.items()}
    lo["w_init"] = inputs["w_init"]
    for prefix, backward in IMPLS:
        o, s = run_op(lo, prefix=prefix, backward=backward)
        assert o.dtype == jnp.bfloat16 and s.w_down.dtype == jnp.float32
        assert rel_err(o, o32) <= 2e-2 and rel_err(s.w_down, s32.w_down) <= 2e-2
    g32 = grads_of(lambda p, e: run_op(p, e), inputs)
    g = grads_of(lambda p, e: run_op(p, e), lo)
    assert g["z"].dtype == jnp.bfloat16 and g["w_init"].dtype == jnp.float32
    for key in GRAD_KEYS:
        if key != "w_down":
            assert rel_err(g[key], g32[key]) <= 2e-2, key
