"""Packed documents (`segment_ids`) on TTT-Linear's Pallas kernels (`impl="pallas_interpret"`)
against the XLA op's packed path, fp32: outputs, final state and every gradient (the slow
weights' included: later documents restart from them) to <= 1e-5 relative; and a packed row
against each of its documents run alone through the kernels.

The kernels walk the flattened slot sequence of `packed.kernel_layout` (a tail read and a
slot's own mini-batch per slot, with `RESET` / `COMMIT` flags); documents shorter than one
mini-batch other than the first are read in XLA (`packed._short_docs`), so the layouts below
mix them with documents of exactly C, with tails, and with a first document shorter than C.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.ttt.test_ttt_linear_kernel import GRAD_NAMES, make_inputs
from ttt_jax.ops import TTTLinearState, ttt_linear
from ttt_jax.ops.ttt import kernel_common
from ttt_jax.testing import OP_TOL, rel_err


def segments(rows, t):
    """`[B, T]` int32 ids from per-row document lengths (each row's lengths sum to T)."""
    out = []
    for lengths in rows:
        assert sum(lengths) == t, lengths
        out.append(np.repeat(np.arange(len(lengths)), lengths))
    return jnp.asarray(np.stack(out), jnp.int32)


def run(impl, args, state, seg, c, group):
    x = dict(args)
    o, s = ttt_linear(
        x.pop("q"),
        x.pop("k"),
        x.pop("v"),
        x.pop("eta"),
        **x,
        mini_batch_size=c,
        initial_state=state,
        segment_ids=seg,
        checkpoint_group=group,
        impl=impl,
    )
    return o, s.W1, s.b1


def value_and_grads(impl, args, state, seg, c, group):
    """`(o, W, b)` and the gradients of `<r_o, o> + <r_W, W> + <r_b, b>` (random r), one jit."""
    f = lambda a, s: run(impl, a, s, seg, c, group)  # noqa: E731
    ks = jax.random.split(jax.random.PRNGKey(11), 3)
    shapes = jax.eval_shape(f, args, state)
    probes = tuple(jax.random.normal(kk, a.shape) for kk, a in zip(ks, shapes, strict=True))

    @jax.jit
    def both(args, state):
        out, vjp = jax.vjp(f, args, state)
        return out, vjp(probes)

    return both(args, state)


CASES = [
    # B, T, H, D, C, checkpoint_group, initial state, document lengths per row
    # tails, short documents, documents of exactly C, short last documents; resets across the
    # checkpoint groups of the backward's replay
    (2, 53, 2, 16, 16, 2, True, ((20, 5, 28), (16, 16, 21))),
    (2, 40, 1, 32, 16, None, True, ((4, 4, 32), (40,))),  # short first documents; one document
    (1, 11, 2, 16, 16, None, True, ((5, 6),)),  # shorter than one mini-batch
    (1, 80, 1, 16, 32, 2, False, ((35, 45),)),  # C = 32
]


@pytest.mark.parametrize("b,t,h,d,c,group,with_state,rows", CASES)
def test_kernel_equals_xla_op_with_segments(b, t, h, d, c, group, with_state, rows):
    args, state = make_inputs(b, t, h, d, c, seed=t + 5 * b, with_state=with_state)
    seg = segments(rows, t)
    (o, w, bias), (ga, gs) = value_and_grads("pallas_interpret", args, state, seg, c, group)
    (o_ref, w_ref, bias_ref), (ga_ref, gs_ref) = value_and_grads("xla", args, state, seg, c, group)

    assert rel_err(o, o_ref) <= OP_TOL
    assert rel_err(w, w_ref) <= OP_TOL
    assert rel_err(bias, bias_ref) <= OP_TOL
    for name in GRAD_NAMES:
        assert rel_err(ga[name], ga_ref[name]) <= OP_TOL, (name, rel_err(ga[name], ga_ref[name]))
    if with_state:
        assert rel_err(gs.W1, gs_ref.W1) <= OP_TOL
        assert rel_err(gs.b1, gs_ref.b1) <= OP_TOL


def test_packed_row_equals_documents_alone_on_the_kernel():
    """Each document of a packed row gets the outputs the kernel gives it alone (the first
    continuing from the initial state, the others from `W1, b1`); the final state is the last
    document's."""
    t, c, lengths = 61, 16, (18, 7, 36)
    args, state = make_inputs(1, t, 1, 16, c, seed=3, with_state=True)
    o, w, bias = run("pallas_interpret", args, state, segments([lengths], t), c, 2)
    start = 0
    for n, length in enumerate(lengths):
        part = {
            key: (val[:, start : start + length] if key in ("q", "k", "v", "eta") else val)
            for key, val in args.items()
        }
        o_doc, w_doc, b_doc = run("pallas_interpret", part, state if n == 0 else None, None, c, 2)
        assert rel_err(o[:, start : start + length], o_doc) <= OP_TOL, n
        start += length
    assert rel_err(w, w_doc) <= OP_TOL
    assert rel_err(bias, b_doc) <= OP_TOL


def test_segmented_kernels_lower_to_triton_without_a_gpu(monkeypatch):
    """With packed documents the forward and backward kernels (their `lax.cond` reset and the
    reset-gradient sums) still lower to Triton IR for CUDA."""
    b, t, h, d, c = 2, 40, 3, 64, 16
    sd, f32 = jax.ShapeDtypeStruct, jnp.float32
    x = {n: sd((b, t, h, d), jnp.bfloat16) for n in ("q", "k", "v")}
    x |= {"eta": sd((b, t, h), f32), "W1": sd((h, d, d), f32), "b1": sd((h, d), f32)}
    x |= {"ln_scale": sd((h, d), f32), "ln_bias": sd((h, d), f32), "token_scale": sd((c,), f32)}
    st = TTTLinearState(W1=sd((b, h, d, d), f32), b1=sd((b, h, d), f32))
    seg = segments([(10, 30), (25, 15)], t)

    def loss(x, st):
        o, w, bias = run("pallas", x, st, seg, c, 2)
        return jnp.sum(o.astype(f32)) + jnp.sum(w) + jnp.sum(bias)

    # impl="pallas" resolves only on a GPU backend; here it is taken as given.
    monkeypatch.setattr(kernel_common, "dispatch", lambda impl, reason: impl)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, st)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2
