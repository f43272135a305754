"""In-Place TTT op (SPEC 3.3): values, final states and every gradient against a plain
per-document, per-chunk reference; both prefixes and both backwards equal; documents packed
with `segment_ids` equal the documents run alone; streaming; strict causality (with an
inclusive-prefix negative control); bf16 inputs; named ValueErrors before tracing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops.inplace.op import InPlaceState, inplace_ttt
from ttt_jax.testing import rel_err

HI = jax.lax.Precision.HIGHEST
Bn, T, F, D, C = 2, 23, 7, 5, 4
ETA = 0.1
TAU = 20.0  # between the smallest and largest chunk delta norms of make_inputs()
IMPLS = [(p, b) for p in ("sequential", "associative") for b in ("custom", "autodiff")]
# Packed documents: short ones (no complete chunk), one of exactly C, ones with complete chunks
# and a tail, starting mid-chunk; row 1 has a long first document with a tail.
SEGMENTS = np.array(
    [
        [0] * 3 + [1] * 9 + [2] * 2 + [3] * 4 + [4] * 5,
        [7] * 10 + [3] * 3 + [9] * 10,
    ],
    np.int32,
)


@pytest.fixture(autouse=True)
def strict_promotion():
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


def make_inputs(seed=0, t=T, k=5, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 6)
    return dict(
        z=jax.random.normal(ks[0], (Bn, t, F), dtype),
        target=jax.random.normal(ks[1], (Bn, t, D), dtype),
        w_down=jax.random.normal(ks[2], (D, F), dtype),
        w_target=0.3 * jax.random.normal(ks[3], (D, D), dtype),
        conv_kernel=jax.random.normal(ks[4], (k, D), dtype),
        w_init=jax.random.normal(ks[5], (Bn, D, F), dtype),
    )


# --- the plain reference: documents and chunks in Python loops, weights materialised


def ref_conv(x, kernel, mode):
    """`[n, d]` -> `[n, d]`, zero outside the n rows."""
    k = kernel.shape[0]
    off = k // 2 if mode == "centered" else 0
    n = x.shape[0]
    xp = jnp.concatenate([jnp.zeros((off, x.shape[1])), x, jnp.zeros((k - 1 - off, x.shape[1]))])
    return sum(kernel[j][None] * xp[j : j + n] for j in range(k))


def reference(
    z,
    target,
    w_down,
    w_target,
    conv_kernel,
    eta,
    *,
    chunk_size,
    conv_mode="centered",
    clip_tau=None,
    segment_ids=None,
    w_init=None,
    inclusive=False,
):
    """Per sample, per document, per chunk: `O = Z W^T`, then `W += eta * clip(V^T Z)` on
    complete chunks. `inclusive=True` is the leaking bug (a chunk reads its own update)."""
    outs, finals = [], []
    for b in range(z.shape[0]):
        seg = np.zeros(z.shape[1], int) if segment_ids is None else np.asarray(segment_ids[b])
        starts = [0] + [t for t in range(1, len(seg)) if seg[t] != seg[t - 1]]
        ob = []
        for i, (s0, s1) in enumerate(zip(starts, starts[1:] + [len(seg)], strict=True)):
            w = w_init[b] if (i == 0 and w_init is not None) else w_down
            for c0 in range(s0, s1, chunk_size):
                c1 = min(c0 + chunk_size, s1)
                zc = z[b, c0:c1]
                delta = None
                if c1 - c0 == chunk_size:
                    v = jnp.einsum(
                        "cd,de->ce",
                        ref_conv(target[b, c0:c1], conv_kernel, conv_mode),
                        w_target,
                        precision=HI,
                    )
                    delta = jnp.einsum("cd,cf->df", v, zc, precision=HI)
                    if clip_tau is not None:
                        delta = delta * jnp.minimum(1.0, clip_tau / jnp.sqrt(jnp.sum(delta**2)))
                if inclusive and delta is not None:
                    w = w + eta * delta
                ob.append(jnp.einsum("cf,df->cd", zc, w, precision=HI))
                if not inclusive and delta is not None:
                    w = w + eta * delta
        outs.append(jnp.concatenate(ob))
        finals.append(w)
    return jnp.stack(outs), jnp.stack(finals)


STATIC = (
    "chunk_size",
    "conv_mode",
    "clip_tau",
    "prefix",
    "backward",
    "checkpoint_group",
    "remat_policy",
)


@functools.partial(jax.jit, static_argnames=STATIC)
def _jit_op(inputs, eta, segment_ids, chunk_size=C, **static):
    w_init = inputs.get("w_init")
    return inplace_ttt(
        inputs["z"],
        inputs["target"],
        w_down=inputs["w_down"],
        w_target=inputs["w_target"],
        conv_kernel=inputs["conv_kernel"],
        eta=eta,
        chunk_size=chunk_size,
        segment_ids=segment_ids,
        initial_state=None if w_init is None else InPlaceState(w_down=w_init),
        **static,
    )


def run_op(inputs, eta=ETA, segment_ids=None, **static):
    """The op, jitted (eager dispatch compiles every small op once per shape: far slower)."""
    return _jit_op(inputs, eta, segment_ids, **static)


def run_ref(inputs, eta=ETA, **kw):
    """The reference, traced once and compiled (its Python loops are slow to run op by op)."""
    args = [inputs[k] for k in ("z", "target", "w_down", "w_target", "conv_kernel")]
    fn = functools.partial(reference, chunk_size=kw.pop("chunk_size", C), **kw)
    return jax.jit(fn)(*args, eta, w_init=inputs.get("w_init"))


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


# --- gradients


def loss_fn(run, inputs, ct, cs):
    o, w = run(inputs)
    w = w.w_down if isinstance(w, InPlaceState) else w
    return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(w * cs)


GRAD_KEYS = ("z", "target", "w_down", "w_target", "conv_kernel", "eta", "w_init")


def grads_of(run, inputs, eta=ETA, seed=9):
    k1, k2 = jax.random.split(jax.random.key(seed))
    ct = jax.random.normal(k1, (Bn, inputs["z"].shape[1], D))
    cs = jax.random.normal(k2, (Bn, D, F))

    def loss(params):
        params = dict(params)
        eta = params.pop("eta")
        return loss_fn(lambda p: run(p, eta), params, ct, cs)

    return jax.jit(jax.grad(loss))(dict(inputs, eta=jnp.asarray(eta)))


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_gradients_of_every_implementation_equal_the_reference(packed):
    inputs = make_inputs(seed=4)
    seg = dict(segment_ids=SEGMENTS) if packed else {}
    # Clipping on, so that its backward is covered (it is active: see the test above).
    g_ref = grads_of(lambda p, e: run_ref(p, e, clip_tau=TAU, **seg), inputs)
    seg = dict(segment_ids=jnp.asarray(SEGMENTS)) if packed else {}
    for prefix, backward in IMPLS:
        g = grads_of(
            lambda p, e, pr=prefix, bw=backward: run_op(
                p, e, clip_tau=TAU, prefix=pr, backward=bw, **seg
            ),
            inputs,
        )
        for key in GRAD_KEYS:
            if key == "w_down" and not packed:
                # w_init replaces w_down for the only document: no gradient either way.
                assert float(jnp.abs(g[key]).max()) == 0.0
                continue
            assert rel_err(g[key], g_ref[key]) <= 1e-5, (prefix, backward, key)


@pytest.mark.parametrize("t", [4 * C + 2, C - 1])
def test_custom_backward_equals_autodiff_without_clipping_and_without_initial_state(t):
    inputs = make_inputs(seed=5, t=t)
    del inputs["w_init"]
    g_auto = grads_of(lambda p, e: run_op(p, e, backward="autodiff"), inputs)
    g_cust = grads_of(lambda p, e: run_op(p, e, backward="custom"), inputs)
    for key in GRAD_KEYS[:-1]:
        if t < C and key in ("target", "w_target", "conv_kernel", "eta"):
            # No complete chunk: nothing is learned, these get exactly no gradient.
            assert float(jnp.abs(g_cust[key]).max()) == 0.0, key
            continue
        assert rel_err(g_cust[key], g_auto[key]) <= 1e-5, (t, key)


def test_custom_backward_equals_autodiff_under_checkpoint_and_inside_scan():
    inputs = make_inputs(seed=6, t=3 * C)
    del inputs["w_init"]
    layers = 2
    stacked = {
        k: jnp.stack([inputs[k], 1.1 * inputs[k]]) for k in ("w_down", "w_target", "conv_kernel")
    }
    stacked["eta"] = jnp.array([ETA, 0.5 * ETA])
    ct = jax.random.normal(jax.random.key(11), (Bn, 3 * C, D))

    def loss(params, backward, remat):
        def layer(z, p):
            def apply(z, p):
                o, _ = inplace_ttt(
                    z,
                    inputs["target"],
                    w_down=p["w_down"],
                    w_target=p["w_target"],
                    conv_kernel=p["conv_kernel"],
                    eta=p["eta"],
                    chunk_size=C,
                    backward=backward,
                )
                # Map back to F features so that the next layer's z depends on this one.
                return jnp.tanh(jnp.einsum("btd,df->btf", o, p["w_down"], precision=HI))

            fn = jax.checkpoint(apply) if remat else apply
            return fn(z, p), None

        z, _ = jax.lax.scan(
            layer, params["z"], {k: v for k, v in params.items() if k != "z"}, length=layers
        )
        return jnp.sum(z[..., :D] * ct)

    params = dict(stacked, z=inputs["z"])
    for remat in (False, True):
        g_auto = jax.jit(jax.grad(functools.partial(loss, backward="autodiff", remat=remat)))(
            params
        )
        g_cust = jax.jit(jax.grad(functools.partial(loss, backward="custom", remat=remat)))(params)
        for key in params:
            assert rel_err(g_cust[key], g_auto[key]) <= 1e-5, (remat, key)


def test_memory_knobs_do_not_change_gradients():
    inputs = make_inputs(seed=7, t=5 * C)
    g0 = grads_of(lambda p, e: run_op(p, e, backward="autodiff"), inputs)
    cases = [
        ("autodiff", dict(checkpoint_group=2, remat_policy="dots")),
        ("autodiff", dict(checkpoint_group=3, remat_policy="save_names:inplace_delta")),
        ("custom", dict(checkpoint_group=2, remat_policy="dots")),
    ]
    for backward, knobs in cases:
        g = grads_of(lambda p, e, kn=knobs, bw=backward: run_op(p, e, backward=bw, **kn), inputs)
        for key in GRAD_KEYS:
            if key != "w_down":
                assert rel_err(g[key], g0[key]) <= 1e-6, (knobs, backward, key)


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


# --- precision and bad inputs


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


def bad_cases():
    good = make_inputs()
    yield "chunk_size", dict(chunk_size=0)
    yield "chunk_size", dict(chunk_size=2.0)
    yield "conv_kernel", dict(conv_kernel=good["conv_kernel"][:2])
    yield "conv_kernel", dict(conv_mode="causal_next")
    yield "conv_mode", dict(conv_mode="causal")
    yield "segment_ids", dict(segment_ids=jnp.zeros((Bn, T + 1), jnp.int32))
    yield "segment_ids", dict(segment_ids=jnp.zeros((Bn, T), jnp.float32))
    yield "clip_tau", dict(clip_tau=0.0)
    yield "clip_tau", dict(clip_tau=-1.0)
    yield "eta", dict(eta=jnp.ones((2,)))
    yield "target", dict(target=good["target"][:, :-1])
    yield "w_down", dict(w_down=good["w_down"][:, :-1])
    yield "w_target", dict(w_target=good["w_target"][:-1])
    yield "initial_state.w_down", dict(initial_state=InPlaceState(w_down=good["w_init"][:1]))
    yield "prefix", dict(prefix="parallel")
    yield "backward", dict(backward="manual")
    yield "checkpoint_group", dict(checkpoint_group=0)
    yield "remat_policy", dict(remat_policy="some")
    yield "state_dtype", dict(state_dtype=jnp.int32)
    yield "state_dtype", dict(state_dtype="floaty")


@pytest.mark.parametrize("name,override", list(bad_cases()), ids=lambda x: str(x)[:20])
def test_bad_arguments_raise_value_errors_naming_them_before_tracing(name, override):
    inputs = make_inputs()
    kwargs = dict(
        w_down=inputs["w_down"],
        w_target=inputs["w_target"],
        conv_kernel=inputs["conv_kernel"],
        eta=ETA,
        chunk_size=C,
    )
    kwargs.update(override)
    z, target = inputs["z"], kwargs.pop("target", inputs["target"])

    def traced(z, target):
        return inplace_ttt(z, target, **kwargs)

    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        jax.make_jaxpr(traced)(z, target)
