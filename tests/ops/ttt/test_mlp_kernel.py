"""TTT-MLP's fused Pallas kernels (`impl="pallas_interpret"`, the Pallas interpreter on the CPU)
against the XLA op, fp32: outputs, final state and every gradient to <= 1e-5 relative (SPEC 5).

The kernel's gradients come from its manual backward (the `custom_vjp`), the XLA op's from JAX
autodiff, so each case is also "custom VJP == autodiff". Both state layouts (`Launch.state_in`
"registers" and "hbm") and hidden blocking are covered. What the interpreter cannot reach (the
Triton compilation, bf16 tensor-core MMAs, the CTA barriers of the HBM scratch and state) is
checked on a GPU by `test_mlp_kernel_gpu.py`; the lowering to Triton IR is checked here.

Interpreter time: the whole file takes about a minute on 2 CPU cores; shapes stay at D <= 32,
T <= 53.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops import TTTMLPState, ttt_mlp
from ttt_jax.ops.ttt.mlp_kernel import Launch, ttt_mlp_pallas
from ttt_jax.testing import OP_TOL, rel_err

SLOW = ("W1", "b1", "W2", "b2")
GRAD_NAMES = ("q", "k", "v", "eta", *SLOW, "ln_scale", "ln_bias", "token_scale")


def make_inputs(b, t, h, d, c, seed, with_state):
    """Fresh random inputs, never zeros (a zero bias or state would hide indexing errors)."""
    f = 4 * d
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 20))
    n = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape)  # noqa: E731
    args = {
        "q": n((b, t, h, d)),
        "k": n((b, t, h, d)),
        "v": n((b, t, h, d)),
        "eta": 0.2 * jax.nn.sigmoid(n((b, t, h))),
        "W1": n((h, d, f), 0.3),
        "b1": n((h, f), 0.1),
        "W2": n((h, f, d), 0.3),
        "b2": n((h, d), 0.1),
        "ln_scale": 1 + n((h, d), 0.1),
        "ln_bias": n((h, d), 0.1),
        "token_scale": 1.0 / jnp.arange(1, c + 1, dtype=float) + n((c,), 0.05),
    }
    state = None
    if with_state:
        state = TTTMLPState(*(args[s][None] + n((b, *args[s].shape), 0.05) for s in SLOW))
    return args, state


def run_op(impl, args, state, c, group, launches=None):
    """`(o, W1, b1, W2, b2)`: through `ttt_mlp(impl=...)`, or, with `launches = (fwd, bwd)`,
    through `ttt_mlp_pallas` with those knobs (the initial state or the broadcast slow weights)."""
    x = dict(args)
    q, k, v, eta = (x.pop(s) for s in ("q", "k", "v", "eta"))
    if launches is None:
        o, s = ttt_mlp(
            q, k, v, eta, **x, mini_batch_size=c, initial_state=state, checkpoint_group=group,
            impl=impl,
        )  # fmt: skip
        return o, s.W1, s.b1, s.W2, s.b2
    if state is None:
        state = TTTMLPState(*(jnp.broadcast_to(x[s], (q.shape[0], *x[s].shape)) for s in SLOW))
    return ttt_mlp_pallas(
        q, k, v, eta, (state.W1, state.b1, state.W2, state.b2), x["ln_scale"], x["ln_bias"],
        x["token_scale"], mini_batch_size=c, checkpoint_group=group, interpret=True,
        fwd=launches[0], bwd=launches[1],
    )  # fmt: skip


def value_and_grads(impl, args, state, c, group, launches=None):
    """The outputs and the gradients of `<r, outputs>` (random r) w.r.t. args and state."""

    def run(args, state):
        return run_op(impl, args, state, c, group, launches)

    shapes = jax.eval_shape(run, args, state)
    ks = jax.random.split(jax.random.PRNGKey(7), len(shapes))
    probes = tuple(jax.random.normal(kk, a.shape) for kk, a in zip(ks, shapes, strict=True))

    @jax.jit
    def both(args, state):
        out, vjp = jax.vjp(run, args, state)
        return out, vjp(probes)

    return both(args, state)


HBM = (Launch(hidden_block=32, state_in="hbm"), Launch(hidden_block=16, state_in="hbm"))
BLOCKED = (Launch(hidden_block=64), Launch(hidden_block=128, state_in="hbm"))
CASES = [
    # B, T, H, D, C, checkpoint_group, initial state, launches (None: ttt_mlp(impl=...))
    (2, 48, 2, 16, 16, None, False, None),  # T a multiple of C, one group, the op's dispatch
    (1, 53, 3, 16, 16, 2, True, HBM),  # partial last mini-batch and group; state in HBM
    (1, 40, 2, 32, 16, 1, True, BLOCKED),  # D=32, a checkpoint per mini-batch, hidden blocks
]


@pytest.mark.parametrize("b,t,h,d,c,group,with_state,launches", CASES)
def test_kernel_equals_xla_op(b, t, h, d, c, group, with_state, launches):
    args, state = make_inputs(b, t, h, d, c, seed=t + 3 * b, with_state=with_state)
    out, (ga, gs) = value_and_grads("pallas_interpret", args, state, c, group, launches)
    out_ref, (ga_ref, gs_ref) = value_and_grads("xla", args, state, c, group)

    assert out[0].dtype == jnp.float32 and all(s.dtype == jnp.float32 for s in out[1:])
    for name, a, r in zip(("o", *SLOW), out, out_ref, strict=True):
        assert rel_err(a, r) <= OP_TOL, (name, rel_err(a, r))
    for name in GRAD_NAMES:
        if with_state and name in SLOW:
            # The slow weights are unused when an initial state is given: both sides give zero.
            assert np.abs(np.asarray(ga[name])).max() == 0, name
            assert np.abs(np.asarray(ga_ref[name])).max() == 0, name
            continue
        assert rel_err(ga[name], ga_ref[name]) <= OP_TOL, (name, rel_err(ga[name], ga_ref[name]))
    if with_state:
        for name in SLOW:
            a, r = getattr(gs, name), getattr(gs_ref, name)
            assert rel_err(a, r) <= OP_TOL, (f"initial_state.{name}", rel_err(a, r))


def test_kernel_gradients_under_checkpoint_and_scan():
    """Two calls chained through the state inside a `jax.checkpoint`-ed `lax.scan` body."""
    b, t, h, d, c = 1, 16, 1, 16, 16
    args, state = make_inputs(b, t, h, d, c, seed=5, with_state=True)
    qs = jnp.stack([args["q"], args["k"]])  # two segments of the stream

    def loss(impl, qs, state, ln_scale):
        @jax.checkpoint
        def body(s, qi):
            o, s = ttt_mlp(
                qi, args["k"], args["v"], args["eta"],
                **{k: args[k] for k in (*SLOW, "ln_bias", "token_scale")}, ln_scale=ln_scale,
                mini_batch_size=c, initial_state=s, impl=impl,
            )  # fmt: skip
            return s, jnp.sum(o * jnp.cos(o))

        s, losses = jax.lax.scan(body, state, qs)
        return losses.sum() + jnp.sum(jnp.sin(s.W1)) + jnp.sum(jnp.cos(s.W2))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    got = grad("pallas_interpret", qs, state, args["ln_scale"])
    want = grad("xla", qs, state, args["ln_scale"])
    for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(a, r) <= OP_TOL


@pytest.mark.parametrize(
    "dtype,d,launches",
    [
        (jnp.bfloat16, 64, (None, None)),  # the defaults (backward in "hbm" at D=64)
        (jnp.bfloat16, 64, (Launch(hidden_block=64, state_in="hbm"), Launch())),
        (jnp.float32, 32, (Launch(hidden_block=32), Launch(hidden_block=64, state_in="hbm"))),
    ],
)
def test_kernels_lower_to_triton_without_a_gpu(dtype, d, launches):
    """The forward and backward kernels lower to Triton IR for CUDA (no GPU needed): catches
    primitives and dtype mixes the Triton backend rejects, which the interpreter accepts."""
    b, t, h, c, f = 2, 40, 3, 16, 4 * d
    sd = jax.ShapeDtypeStruct
    f32 = jnp.float32
    state = (sd((b, h, d, f), f32), sd((b, h, f), f32), sd((b, h, f, d), f32), sd((b, h, d), f32))
    args = (
        *(sd((b, t, h, d), dtype) for _ in range(3)),
        sd((b, t, h), f32),
        state,
        sd((h, d), f32),
        sd((h, d), f32),
        sd((c,), f32),
    )

    def loss(*a):
        o, *s = ttt_mlp_pallas(
            *a, mini_batch_size=c, checkpoint_group=2, interpret=False, fwd=launches[0],
            bwd=launches[1],
        )  # fmt: skip
        return jnp.sum(o.astype(f32)) + sum(jnp.sum(x) for x in s)

    lowered = jax.jit(jax.grad(loss, argnums=tuple(range(8)))).trace(*args)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # forward (with checkpoints) and backward


def _call(impl, d=16, f=None, c=16, **kw):
    args, _ = make_inputs(1, 20, 1, d, c, seed=2, with_state=False)
    if f is not None:
        args["W1"], args["b1"] = args["W1"][..., :f], args["b1"][..., :f]
        args["W2"] = args["W2"][:, :f]
    x = dict(args)
    pos = [x.pop(n) for n in ("q", "k", "v", "eta")]
    return ttt_mlp(*pos, **x, mini_batch_size=c, impl=impl, **kw)


def test_auto_is_xla_on_cpu_and_with_segments():
    """`auto` traces the XLA path on the CPU, and with `segment_ids` (whose kernel path has
    not passed the GPU check yet)."""
    seg = {"segment_ids": jnp.array([[0] * 7 + [1] * 13])}
    for kw in ({}, seg):
        auto = jax.make_jaxpr(lambda kw=kw: _call("auto", **kw))()
        xla = jax.make_jaxpr(lambda kw=kw: _call("xla", **kw))()
        assert str(auto) == str(xla)
        assert "pallas_call" not in str(auto)


@pytest.mark.parametrize(
    "impl,kw,match",
    [
        ("triton", {}, "impl='triton' is not one of"),
        ("pallas", {}, "impl='pallas' needs a CUDA GPU"),
        ("pallas_interpret", {"d": 128}, r"head dim D=128 .* \(16, 32, 64\)"),
        ("pallas_interpret", {"f": 48}, r"hidden width F=48 \(W1.shape\[-1\]\) is not one of"),
        ("pallas_interpret", {"c": 8}, r"mini_batch_size=8 is not one of \(16, 32, 64\)"),
        ("pallas_interpret", {"state_dtype": jnp.bfloat16}, "state_dtype=bfloat16 must be"),
    ],
)
def test_bad_impl_arguments_raise(impl, kw, match):
    if impl == "pallas" and jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: impl='pallas' is supported")
    with pytest.raises(ValueError, match=match):
        _call(impl, **kw)


@pytest.mark.parametrize(
    "launch,match",
    [
        (dict(hidden_block=24), r"hidden_block=24 must be a power of two >= 16 dividing .* F=64"),
        (dict(hidden_block=128), r"hidden_block=128 must be .* F=64"),
    ],
)
def test_bad_launch_raises(launch, match):
    args, state = make_inputs(1, 20, 1, 16, 16, seed=3, with_state=True)
    with pytest.raises(ValueError, match=match):
        run_op("pallas_interpret", args, state, 16, None, (Launch(**launch), None))
    for bad, msg in ((dict(state_in="smem"), "state_in='smem'"), (dict(num_warps=3), "power")):
        with pytest.raises(ValueError, match=msg):
            Launch(**bad)
