"""Packed documents (`segment_ids`) on TTT-MLP's Pallas kernels (`impl="pallas_interpret"`)
against the XLA op's packed path, fp32: outputs, final state and every gradient (the slow
weights' included: later documents restart from them) to <= 1e-5 relative, with the state in
registers and in HBM (`Launch.state_in`, where the reset is a copy into the HBM buffer and the
backward zeroes the buffered cotangent).

The kernels walk the flattened slot sequence of `packed.kernel_layout`, as the TTT-Linear
kernel's (`test_ttt_linear_kernel_segments.py`, which holds the layout-by-layout cases).
"""

import jax
import jax.numpy as jnp
import pytest

from tests.ops.ttt.test_mlp_kernel import GRAD_NAMES, HBM, SLOW, make_inputs
from tests.ops.ttt.test_ttt_linear_kernel_segments import segments
from ttt_jax.ops import ttt_mlp
from ttt_jax.ops.ttt import kernel_common, mlp_kernel
from ttt_jax.testing import OP_TOL, rel_err


def value_and_grads(impl, args, state, seg, c, group):
    """`(o, W1, b1, W2, b2)` and the gradients of `<r, outputs>` (random r), one jit."""

    def run(args, state):
        x = dict(args)
        q, k, v, eta = (x.pop(s) for s in ("q", "k", "v", "eta"))
        o, s = ttt_mlp(
            q, k, v, eta, **x, mini_batch_size=c, initial_state=state, segment_ids=seg,
            checkpoint_group=group, impl=impl,
        )  # fmt: skip
        return o, s.W1, s.b1, s.W2, s.b2

    shapes = jax.eval_shape(run, args, state)
    ks = jax.random.split(jax.random.PRNGKey(13), len(shapes))
    probes = tuple(jax.random.normal(kk, a.shape) for kk, a in zip(ks, shapes, strict=True))

    @jax.jit
    def both(args, state):
        out, vjp = jax.vjp(run, args, state)
        return out, vjp(probes)

    return both(args, state)


CASES = [
    # B, T, H, D, C, checkpoint_group, initial state, document lengths per row, state_in
    (2, 53, 2, 16, 16, 2, True, ((20, 5, 28), (16, 16, 21)), "registers"),
    (1, 45, 1, 16, 16, 1, False, ((10, 35),), "hbm"),  # blocked hidden units as well
]


@pytest.mark.parametrize("b,t,h,d,c,group,with_state,rows,state_in", CASES)
def test_kernel_equals_xla_op_with_segments(
    b, t, h, d, c, group, with_state, rows, state_in, monkeypatch
):
    if state_in == "hbm":  # the op takes the default launches: make them HBM ones
        monkeypatch.setattr(mlp_kernel, "launch_defaults", lambda d, backward, **_: HBM[backward])
    args, state = make_inputs(b, t, h, d, c, seed=t + 7 * b, with_state=with_state)
    seg = segments(rows, t)
    out, (ga, gs) = value_and_grads("pallas_interpret", args, state, seg, c, group)
    out_ref, (ga_ref, gs_ref) = value_and_grads("xla", args, state, seg, c, group)

    for name, a, r in zip(("o", *SLOW), out, out_ref, strict=True):
        assert rel_err(a, r) <= OP_TOL, (name, rel_err(a, r))
    for name in GRAD_NAMES:
        assert rel_err(ga[name], ga_ref[name]) <= OP_TOL, (name, rel_err(ga[name], ga_ref[name]))
    if with_state:
        for name in SLOW:
            a, r = getattr(gs, name), getattr(gs_ref, name)
            assert rel_err(a, r) <= OP_TOL, (f"initial_state.{name}", rel_err(a, r))


def test_segmented_kernels_lower_to_triton_without_a_gpu(monkeypatch):
    """With packed documents the forward (state in registers: the reset a `lax.cond`) and the
    backward (state in HBM at D=64: the reset a copy, the cotangent zeroed in the buffer) still
    lower to Triton IR for CUDA."""
    b, t, h, d, c = 1, 40, 2, 64, 16
    sd, f32 = jax.ShapeDtypeStruct, jnp.float32
    f = 4 * d
    x = {n: sd((b, t, h, d), jnp.bfloat16) for n in ("q", "k", "v")}
    x |= {"eta": sd((b, t, h), f32), "W1": sd((h, d, f), f32), "b1": sd((h, f), f32)}
    x |= {"W2": sd((h, f, d), f32), "b2": sd((h, d), f32), "ln_scale": sd((h, d), f32)}
    x |= {"ln_bias": sd((h, d), f32), "token_scale": sd((c,), f32)}
    seg = segments([(10, 30)], t)

    def loss(x):
        x = dict(x)
        q, k, v, eta = (x.pop(s) for s in ("q", "k", "v", "eta"))
        o, s = ttt_mlp(q, k, v, eta, **x, mini_batch_size=c, segment_ids=seg, impl="pallas")
        return jnp.sum(o.astype(f32)) + sum(jnp.sum(a) for a in jax.tree.leaves(s))

    # impl="pallas" resolves only on a GPU backend; here it is taken as given.
    monkeypatch.setattr(kernel_common, "dispatch", lambda impl, reason: impl)
    text = jax.jit(jax.grad(loss)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2
