"""TTT-Linear's fused Pallas kernels (`impl="pallas_interpret"`, the Pallas interpreter on the CPU)
against the XLA op, fp32: outputs, final state and every gradient to <= 1e-5 relative (SPEC 5).

The kernel's gradients come from its manual backward (the `custom_vjp`), the XLA op's from JAX
autodiff, so each case is also "custom VJP == autodiff". What the interpreter cannot reach (the
Triton lowering, bf16 tensor-core MMAs, the CTA barrier of the backward's scratch) is checked on
a GPU by `test_ttt_linear_kernel_gpu.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops import TTTLinearState, ttt_linear
from ttt_jax.ops.ttt.linear_kernel import ttt_linear_pallas
from ttt_jax.testing import OP_TOL, rel_err

GRAD_NAMES = ("q", "k", "v", "eta", "W1", "b1", "ln_scale", "ln_bias", "token_scale")


def make_inputs(b, t, h, d, c, seed, with_state):
    """Fresh random inputs, never zeros (a zero bias or state would hide indexing errors)."""
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    n = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape)  # noqa: E731
    args = {
        "q": n((b, t, h, d)),
        "k": n((b, t, h, d)),
        "v": n((b, t, h, d)),
        "eta": 0.2 * jax.nn.sigmoid(n((b, t, h))),
        "W1": n((h, d, d), 0.2),
        "b1": n((h, d), 0.1),
        "ln_scale": 1 + n((h, d), 0.1),
        "ln_bias": n((h, d), 0.1),
        "token_scale": 1.0 / jnp.arange(1, c + 1, dtype=float) + n((c,), 0.05),
    }
    state = None
    if with_state:
        state = TTTLinearState(
            W1=args["W1"][None] + n((b, h, d, d), 0.05), b1=args["b1"][None] + n((b, h, d), 0.05)
        )
    return args, state


def value_and_grads(impl, args, state, c, group):
    """`(o, W, b)` and the gradients of `<r_o, o> + <r_W, W> + <r_b, b>` (random r), one jit."""

    def run(args, state):
        x = dict(args)
        o, s = ttt_linear(
            x.pop("q"),
            x.pop("k"),
            x.pop("v"),
            x.pop("eta"),
            **x,
            mini_batch_size=c,
            initial_state=state,
            checkpoint_group=group,
            impl=impl,
        )
        return o, s.W1, s.b1

    shapes = jax.eval_shape(run, args, state)
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    probes = tuple(jax.random.normal(kk, a.shape) for kk, a in zip(ks, shapes, strict=True))

    @jax.jit
    def both(args, state):
        out, vjp = jax.vjp(run, args, state)
        return out, vjp(probes)

    return both(args, state)


CASES = [
    # B, T, H, D, C, checkpoint_group, initial state
    (2, 48, 2, 16, 16, None, False),  # T a multiple of C, one group
    (1, 53, 3, 16, 16, 2, True),  # partial last mini-batch, partial last group
    (3, 40, 1, 32, 16, 1, False),  # a checkpoint at every mini-batch
    (2, 11, 2, 16, 16, None, True),  # shorter than one mini-batch: no update at all
    (1, 80, 2, 16, 32, 2, True),  # C = 32
]


@pytest.mark.parametrize("b,t,h,d,c,group,with_state", CASES)
def test_kernel_equals_xla_op(b, t, h, d, c, group, with_state):
    args, state = make_inputs(b, t, h, d, c, seed=t + 3 * b, with_state=with_state)
    (o, w, bias), (ga, gs) = value_and_grads("pallas_interpret", args, state, c, group)
    (o_ref, w_ref, bias_ref), (ga_ref, gs_ref) = value_and_grads("xla", args, state, c, group)

    assert o.dtype == jnp.float32 and w.dtype == jnp.float32
    assert rel_err(o, o_ref) <= OP_TOL
    assert rel_err(w, w_ref) <= OP_TOL
    assert rel_err(bias, bias_ref) <= OP_TOL
    for name in GRAD_NAMES:
        if with_state and name in ("W1", "b1"):
            # The slow weights are unused when an initial state is given: both sides give zero.
            assert np.abs(np.asarray(ga[name])).max() == 0, name
            assert np.abs(np.asarray(ga_ref[name])).max() == 0, name
            continue
        assert rel_err(ga[name], ga_ref[name]) <= OP_TOL, (name, rel_err(ga[name], ga_ref[name]))
    if with_state:
        assert rel_err(gs.W1, gs_ref.W1) <= OP_TOL
        assert rel_err(gs.b1, gs_ref.b1) <= OP_TOL


def test_kernel_gradients_under_checkpoint_and_scan():
    """Two calls chained through the state inside a `jax.checkpoint`-ed `lax.scan` body."""
    b, t, h, d, c = 1, 32, 2, 16, 16
    args, state = make_inputs(b, t, h, d, c, seed=5, with_state=True)
    qs = jnp.stack([args["q"], args["k"]])  # two segments of the stream

    def loss(impl, qs, state, ln_scale):
        @jax.checkpoint
        def body(s, qi):
            o, s = ttt_linear(
                qi,
                args["k"],
                args["v"],
                args["eta"],
                W1=args["W1"],
                b1=args["b1"],
                ln_scale=ln_scale,
                ln_bias=args["ln_bias"],
                token_scale=args["token_scale"],
                mini_batch_size=c,
                initial_state=s,
                impl=impl,
            )
            return s, jnp.sum(o * jnp.cos(o))

        s, losses = jax.lax.scan(body, state, qs)
        return losses.sum() + jnp.sum(jnp.sin(s.W1))

    got = jax.grad(loss, argnums=(1, 2, 3))("pallas_interpret", qs, state, args["ln_scale"])
    want = jax.grad(loss, argnums=(1, 2, 3))("xla", qs, state, args["ln_scale"])
    for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(a, r) <= OP_TOL


@pytest.mark.parametrize("dtype,d", [(jnp.bfloat16, 64), (jnp.float32, 128)])
def test_kernels_lower_to_triton_without_a_gpu(dtype, d):
    """The forward and backward kernels lower to Triton IR for CUDA (no GPU needed): catches
    primitives and dtype mixes the Triton backend rejects, which the interpreter accepts."""
    b, t, h, c = 2, 40, 3, 16
    sd = jax.ShapeDtypeStruct
    f32 = jnp.float32
    args = (
        *(sd((b, t, h, d), dtype) for _ in range(3)),
        sd((b, t, h), f32),
        sd((b, h, d, d), f32),
        sd((b, h, d), f32),
        sd((h, d), f32),
        sd((h, d), f32),
        sd((c,), f32),
    )

    def loss(*a):
        o, w, bias = ttt_linear_pallas(*a, mini_batch_size=c, checkpoint_group=2, interpret=False)
        return jnp.sum(o.astype(f32)) + jnp.sum(w) + jnp.sum(bias)

    lowered = jax.jit(jax.grad(loss, argnums=tuple(range(9)))).trace(*args)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # forward (with checkpoints) and backward


def test_auto_is_xla_on_cpu():
    args, _ = make_inputs(1, 20, 1, 16, 16, seed=1, with_state=False)
    x = dict(args)
    pos = [x.pop(n) for n in ("q", "k", "v", "eta")]
    o_auto, _ = ttt_linear(*pos, **x, impl="auto")
    o_xla, _ = ttt_linear(*pos, **x, impl="xla")
    np.testing.assert_array_equal(np.asarray(o_auto), np.asarray(o_xla))


def _call(impl, d=16, c=16, **kw):
    args, _ = make_inputs(1, 20, 1, d, c, seed=2, with_state=False)
    x = dict(args)
    pos = [x.pop(n) for n in ("q", "k", "v", "eta")]
    return ttt_linear(*pos, **x, mini_batch_size=c, impl=impl, **kw)


@pytest.mark.parametrize(
    "impl,kw,match",
    [
        ("triton", {}, "impl='triton' is not one of"),
        ("pallas", {}, "impl='pallas' needs a CUDA GPU"),
        ("pallas_interpret", {"d": 24}, r"head dim D=24 .* \(16, 32, 64, 128\)"),
        ("pallas_interpret", {"c": 8}, r"mini_batch_size=8 is not one of \(16, 32, 64\)"),
        ("pallas_interpret", {"state_dtype": jnp.bfloat16}, "state_dtype=bfloat16 must be"),
    ],
)
def test_bad_impl_arguments_raise(impl, kw, match):
    if impl == "pallas" and jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: impl='pallas' is supported")
    with pytest.raises(ValueError, match=match):
        _call(impl, **kw)
