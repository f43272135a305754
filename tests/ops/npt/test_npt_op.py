"""NPT ops (SPEC 3.4): the efficient forms equal the materialised-Delta-W forms, in value and in
every gradient; bf16 inputs accumulate in fp32; bad shapes fail with named ValueErrors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from ttt_jax.ops.npt import npt_generated_rank_k_linear, npt_modulated_linear, npt_rank_k_linear
from ttt_jax.testing import rel_err

HI = jax.lax.Precision.HIGHEST
Bn, S, D, F, R, K = 2, 5, 6, 7, 3, 2


def randn(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype)


def modulated_inputs(seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    return dict(
        h=randn(ks[0], (Bn, S, D), dtype),
        m=randn(ks[1], (Bn, S, R), dtype),
        W=randn(ks[2], (D, F), dtype),
        A=randn(ks[3], (D, R), dtype),
        B=randn(ks[4], (R, F), dtype),
    )


def rank_k_inputs(seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    return dict(
        h=randn(ks[0], (Bn, S, D), dtype),
        u=randn(ks[1], (Bn, S, K, D), dtype),
        w=randn(ks[2], (Bn, S, K, F), dtype),
        W=randn(ks[3], (D, F), dtype),
    )


def generated_inputs(seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    return dict(
        h=randn(ks[0], (Bn, S, D), dtype),
        g=randn(ks[1], (Bn, S, R), dtype),
        W=randn(ks[2], (D, F), dtype),
        W_u=randn(ks[3], (R, K, D), dtype),
        W_w=randn(ks[4], (R, K, F), dtype),
    )


def materialised_modulated(h, m, W, A, B):
    """`h_t (W + Delta W_t)` with `Delta W_t = A diag(m_t) B` formed per token."""
    delta = jnp.einsum("dr,bsr,rf->bsdf", A, m, B, precision=HI)
    return jnp.einsum("bsd,bsdf->bsf", h, W[None, None] + delta, precision=HI)


def materialised_rank_k(h, u, w, W):
    delta = jnp.einsum("bskd,bskf->bsdf", u, w, precision=HI)
    return jnp.einsum("bsd,bsdf->bsf", h, W[None, None] + delta, precision=HI)


def materialised_generated(h, g, W, W_u, W_w):
    u = jnp.einsum("bsr,rkd->bskd", g, W_u, precision=HI)
    w = jnp.einsum("bsr,rkf->bskf", g, W_w, precision=HI)
    return materialised_rank_k(h, u, w, W)


def efficient_modulated(h, m, W, A, B):
    return npt_modulated_linear(h, m, W=W, A=A, B=B)


def efficient_rank_k(h, u, w, W):
    return npt_rank_k_linear(h, u, w, W=W)


def efficient_generated(h, g, W, W_u, W_w):
    return npt_generated_rank_k_linear(h, g, W=W, W_u=W_u, W_w=W_w)


CASES = [
    (efficient_modulated, materialised_modulated, modulated_inputs),
    (efficient_rank_k, materialised_rank_k, rank_k_inputs),
    (efficient_generated, materialised_generated, generated_inputs),
]
IDS = ["low_rank", "rank_k", "generated_rank_k"]


@pytest.mark.parametrize("fast, slow, make", CASES, ids=IDS)
def test_equals_materialised_delta_w_fp32(fast, slow, make):
    args = make()
    names = list(args)
    ct = randn(jax.random.key(9), (Bn, S, F))

    def vjp_all(fn):
        y, pull = jax.vjp(lambda *xs: fn(**dict(zip(names, xs, strict=True))), *args.values())
        return y, pull(ct)

    y, grads = jax.jit(lambda: vjp_all(fast))()
    y_ref, grads_ref = vjp_all(slow)
    assert y.shape == (Bn, S, F) and y.dtype == jnp.float32
    assert rel_err(y, y_ref) <= 1e-5
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.shape == args[name].shape
        assert float(jnp.linalg.norm(g_ref)) > 0.0, name
        assert rel_err(g, g_ref) <= 1e-5, name


def test_rank_k_with_k_equal_r_is_the_modulated_form():
    """`A diag(m_t) B` is the rank-k form with `u_{t,i} = m_{t,i} A[:, i]`, `w_{t,i} = B[i]`."""
    a = modulated_inputs(seed=3)
    u = jnp.einsum("bsr,dr->bsrd", a["m"], a["A"], precision=HI)
    w = jnp.broadcast_to(a["B"], (Bn, S, R, F))
    y1 = npt_modulated_linear(a["h"], a["m"], W=a["W"], A=a["A"], B=a["B"])
    y2 = npt_rank_k_linear(a["h"], u, w, W=a["W"])
    assert rel_err(y1, y2) <= 1e-5


@pytest.mark.parametrize("fast, slow, make", CASES, ids=IDS)
def test_bf16_inputs_give_bf16_output_close_to_fp32(fast, slow, make):
    args = make(seed=1, dtype=jnp.bfloat16)
    y = fast(**args)
    assert y.dtype == jnp.bfloat16
    y_ref = slow(**{k: v.astype(jnp.float32) for k, v in args.items()})
    # bf16 roundings (rel 2^-8 each) of the dense and low-rank terms and of their sum, plus
    # the bf16 rounding of h A before the B matmul.
    assert rel_err(y.astype(jnp.float32), y_ref) <= 2e-2


@pytest.mark.parametrize("fast, make", [(c[0], c[2]) for c in CASES], ids=IDS)
def test_bf16_matmuls_accumulate_in_fp32(fast, make):
    args = make(dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda a: fast(**a))(args)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) >= 3
    for e in dots:
        assert e.params["preferred_element_type"] == jnp.float32
    # every wide matmul takes bf16 operands; only r- or k-wide contractions stay fp32
    wide = [e for e in dots if any(D in v.aval.shape or F in v.aval.shape for v in e.invars)]
    assert len(wide) >= 2
    for e in wide:
        assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars), e


def test_fp32_accumulation_beats_bf16_accumulation():
    """A long sum of bf16 products: fp32 accumulation keeps it, bf16 accumulation would not."""
    d = 4096
    h = jnp.ones((1, 1, d), jnp.bfloat16)
    W = jnp.full((d, 1), 1.0 + 2.0**-7, jnp.bfloat16)
    zero = dict(
        m=jnp.zeros((1, 1, 1), jnp.bfloat16),
        A=jnp.zeros((d, 1), jnp.bfloat16),
        B=jnp.zeros((1, 1), jnp.bfloat16),
    )
    y = npt_modulated_linear(h, W=W, **zero)
    # exact: 4096 * (1 + 2^-7) = 4128, a bf16 number; a bf16 running sum stalls at 256 + ...
    assert float(y[0, 0, 0]) == 4128.0


def modulated_error(**override):
    args = modulated_inputs()
    args.update(override)
    return lambda: npt_modulated_linear(args["h"], args["m"], W=args["W"], A=args["A"], B=args["B"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"B": jnp.zeros((R + 1, F))}, r"B has shape \(4, 7\) but A gives r=3"),
        ({"A": jnp.zeros((D, R + 1))}, r"B has shape \(3, 7\) but A gives r=4"),
        ({"m": jnp.zeros((Bn, S, R + 2))}, r"m has shape \(2, 5, 5\) but A gives r=3.*\(2, 5, 3\)"),
        ({"m": jnp.zeros((Bn, S + 1, R))}, r"m has shape \(2, 6, 3\) but h gives S=5"),
        ({"m": jnp.zeros((Bn * S, R))}, r"m must have rank 3 .*got shape \(10, 3\)"),
        ({"W": jnp.zeros((D + 1, F))}, r"W has shape \(7, 7\) but h gives d=6.*\(6, F\)"),
        ({"A": jnp.zeros((D + 1, R))}, r"A has shape \(7, 3\) but h gives d=6"),
        ({"B": jnp.zeros((R, F + 1))}, r"B has shape \(3, 8\) but W gives F=7"),
        ({"h": jnp.zeros((Bn, S, D), jnp.int32)}, r"h must have a floating dtype"),
    ],
)
def test_modulated_bad_shapes_raise_named_value_errors(override, pattern):
    call = modulated_error(**override)
    with pytest.raises(ValueError, match=pattern):
        call()
    with pytest.raises(ValueError, match=pattern):
        jax.jit(call)()


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"u": jnp.zeros((Bn, S, K, D + 1))}, r"u has shape \(2, 5, 2, 7\) but h gives d=6"),
        ({"w": jnp.zeros((Bn, S, K + 1, F))}, r"w has shape \(2, 5, 3, 7\) but u gives k=2"),
        ({"w": jnp.zeros((Bn, S, K, F + 1))}, r"w has shape \(2, 5, 2, 8\) but W gives F=7"),
        ({"u": jnp.zeros((Bn, S, D))}, r"u must have rank 4"),
        ({"W": jnp.zeros((D - 1, F))}, r"W has shape \(5, 7\) but h gives d=6"),
    ],
)
def test_rank_k_bad_shapes_raise_named_value_errors(override, pattern):
    args = rank_k_inputs()
    args.update(override)
    with pytest.raises(ValueError, match=pattern):
        npt_rank_k_linear(args["h"], args["u"], args["w"], W=args["W"])


def test_generated_equals_rank_k_with_generated_vectors():
    a = generated_inputs(seed=4)
    u = jnp.einsum("bsr,rkd->bskd", a["g"], a["W_u"], precision=HI)
    w = jnp.einsum("bsr,rkf->bskf", a["g"], a["W_w"], precision=HI)
    y1 = npt_generated_rank_k_linear(a["h"], a["g"], W=a["W"], W_u=a["W_u"], W_w=a["W_w"])
    y2 = npt_rank_k_linear(a["h"], u, w, W=a["W"])
    assert rel_err(y1, y2) <= 1e-5


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"g": jnp.zeros((Bn, S, R + 1))}, r"W_u has shape \(3, 2, 6\) but g gives r=4"),
        ({"W_w": jnp.zeros((R, K + 1, F))}, r"W_w has shape \(3, 3, 7\) but W_u gives k=2"),
        ({"W_u": jnp.zeros((R, K, D + 1))}, r"W_u has shape \(3, 2, 7\) but h gives d=6"),
        ({"W_w": jnp.zeros((R, K, F - 1))}, r"W_w has shape \(3, 2, 6\) but W gives F=7"),
    ],
)
def test_generated_bad_shapes_raise_named_value_errors(override, pattern):
    args = generated_inputs()
    args.update(override)
    with pytest.raises(ValueError, match=pattern):
        efficient_generated(**args)
