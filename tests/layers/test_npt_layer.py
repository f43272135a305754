"""NPT MLP and NPT block (SPEC 3.4): the layers equal a hand-written materialised-Delta-W
computation of the same math, configs validate, params carry logical axes, the regulariser has
the documented normalisation, and `attn_residual` routes attention as documented."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers.common import BF16
from ttt_jax.layers.npt_block import NPTBlock, NPTBlockConfig, causal_attention
from ttt_jax.layers.npt_mlp import NPTMLP, NPTMLPConfig
from ttt_jax.ops.core import rms_norm
from ttt_jax.ops.rope import rope
from ttt_jax.testing import rel_err

HI = jax.lax.Precision.HIGHEST
Bn, S, D, F, R, K, DM = 2, 6, 8, 12, 4, 3, 10


def inputs(seed=0, d_mod=D):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (Bn, S, D)), jax.random.normal(k2, (Bn, S, d_mod))


def enlarge(model, factor):
    """Scales the modulation params up so that Delta W_t is not negligible in the test."""
    for name in ("A", "B", "A_m", "W_u", "W_w"):
        if hasattr(model, name):
            p = getattr(model, name)
            p[...] = p[...] * factor


def reference_mlp(p, cfg, x, a):
    """The NPT MLP with Delta W_t formed per token; returns (y, aux)."""
    if cfg.modulation == "low_rank":
        m = cfg.mod_scale * jnp.tanh(jnp.einsum("bsi,ir->bsr", a, p["A_m"], precision=HI))
        u = jnp.einsum("bsr,dr->bsrd", m, p["A"], precision=HI)  # u_{t,i} = m_{t,i} A[:, i]
        w = jnp.broadcast_to(p["B"], (*x.shape[:2], *p["B"].shape))  # w_{t,i} = B[i]
    elif cfg.modulation == "rank_k":
        r_t = jnp.einsum("bsi,ir->bsr", a, p["W_gen"], precision=HI)
        u = jnp.einsum("bsr,rkd->bskd", r_t, p["W_u"], precision=HI)
        w = jnp.einsum("bsr,rkf->bskf", r_t, p["W_w"], precision=HI)
    else:
        u = jnp.zeros((*x.shape[:2], 1, x.shape[-1]))
        w = jnp.zeros((*x.shape[:2], 1, p["W_gate"].shape[-1]))
    w_t = p["W_gate"][None, None] + jnp.einsum("bskd,bskf->bsdf", u, w, precision=HI)
    gate = jnp.einsum("bsd,bsdf->bsf", x, w_t, precision=HI)
    up = jnp.einsum("bsd,df->bsf", x, p["W_up"], precision=HI)
    y = jnp.einsum("bsf,fd->bsd", jax.nn.silu(gate) * up, p["W_down"], precision=HI)
    tokens = x.shape[0] * x.shape[1]
    aux = cfg.reg_lambda * (jnp.sum(u * u) + jnp.sum(w * w)) / tokens
    return y, aux


@pytest.mark.parametrize(
    "modulation, form",
    [("low_rank", None), ("rank_k", "factored"), ("rank_k", "vectors"), ("none", None)],
)
def test_mlp_equals_materialised_reference_values_and_grads(modulation, form):
    cfg = NPTMLPConfig(
        d_model=D,
        d_ff=F,
        d_mod=DM,
        modulation=modulation,
        rank=R,
        k=K,
        reg_lambda=0.3,
        rank_k_form=form or "factored",
    )
    model = NPTMLP(cfg, rngs=nnx.Rngs(0))
    enlarge(model, 30.0)
    graphdef, state = nnx.split(model, nnx.Param)
    x, a = inputs(d_mod=DM)
    ct = jax.random.normal(jax.random.key(7), (Bn, S, D))

    def loss_fast(state, x, a):
        y, aux = nnx.merge(graphdef, state)(x, a)
        return jnp.sum(y * ct) + aux, (y, aux)

    def loss_ref(state, x, a):
        p = {path[0]: v[...] for path, v in nnx.to_flat_state(state)}
        y, aux = reference_mlp(p, cfg, x, a)
        return jnp.sum(y * ct) + aux, (y, aux)

    (_, (y, aux)), g = jax.jit(jax.value_and_grad(loss_fast, (0, 1, 2), has_aux=True))(state, x, a)
    (_, (y_ref, aux_ref)), g_ref = jax.value_and_grad(loss_ref, (0, 1, 2), has_aux=True)(
        state, x, a
    )
    assert y.shape == (Bn, S, D) and y.dtype == jnp.float32 and aux.dtype == jnp.float32
    assert rel_err(y, y_ref) <= 1e-5
    if modulation == "none":
        assert float(aux) == 0.0
    else:
        assert float(aux_ref) > 0.0
        assert abs(float(aux) - float(aux_ref)) <= 1e-5 * float(aux_ref)
    leaves, leaves_ref = jax.tree.leaves_with_path(g), jax.tree.leaves(g_ref)
    for (path, gv), gr in zip(leaves, leaves_ref, strict=True):
        if float(jnp.linalg.norm(gr)) == 0.0:  # only d loss / d a of the plain MLP
            assert modulation == "none" and gv.shape == a.shape, path
            assert float(jnp.linalg.norm(gv)) == 0.0
            continue
        assert rel_err(gv, gr) <= 1e-5, jax.tree_util.keystr(path)
    # the modulation is not negligible here: the test would notice a dropped Delta W_t
    if modulation != "none":
        plain = NPTMLP(dataclasses.replace(cfg, modulation="none"), rngs=nnx.Rngs(0))
        y_plain, _ = plain(x, a)
        assert rel_err(y_plain, y) > 1e-3


def test_low_rank_with_zero_A_is_the_plain_mlp():
    cfg = NPTMLPConfig(d_model=D, d_ff=F, rank=R)
    model = NPTMLP(cfg, rngs=nnx.Rngs(1))
    model.A[...] = jnp.zeros_like(model.A[...])
    plain = NPTMLP(dataclasses.replace(cfg, modulation="none"), rngs=nnx.Rngs(1))
    x, a = inputs(seed=2)
    y, _ = model(x, a)
    y_plain, _ = plain(x, a)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_plain))


def axes_of(variable):
    # flax 0.12 stores `sharding_names=` under `out_sharding`; older releases kept the name.
    meta = variable.get_metadata()
    return tuple(meta["out_sharding"] if "out_sharding" in meta else meta["sharding_names"])


def test_init_scales_and_logical_axes():
    d, f, r = 256, 64, 16
    lr = NPTMLP(NPTMLPConfig(d_model=d, d_ff=f, rank=r), rngs=nnx.Rngs(0))
    assert float(jnp.std(lr.A[...])) == pytest.approx(0.01 / math.sqrt(d), rel=0.05)
    assert float(jnp.std(lr.A_m[...])) == pytest.approx(0.01 / math.sqrt(d), rel=0.05)
    assert float(jnp.std(lr.B[...])) == pytest.approx(0.01 / math.sqrt(r), rel=0.05)
    axes = {
        k: axes_of(v)
        for k, v in (
            (".".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(lr, nnx.Param))
        )
    }
    assert axes == {
        "W_gate": ("embed", "mlp"),
        "W_up": ("embed", "mlp"),
        "W_down": ("mlp", "embed"),
        "A": ("embed", "rank"),
        "B": ("rank", "mlp"),
        "A_m": ("embed", "rank"),
    }
    cfg = NPTBlockConfig(
        num_heads=2,
        head_dim=4,
        mlp=NPTMLPConfig(d_model=D, d_ff=F, modulation="rank_k", rank=R, k=K),
    )
    block = NPTBlock(cfg, rngs=nnx.Rngs(0))
    for path, v in nnx.to_flat_state(nnx.state(block, nnx.Param)):
        names = axes_of(v)
        assert len(names) == v[...].ndim, path
        assert any(n is not None for n in names), path
    assert axes_of(block.W_q) == ("embed", "heads", "head_dim")
    assert axes_of(block.W_o) == ("heads", "head_dim", "embed")
    assert axes_of(block.mlp.W_u) == ("rank", None, "embed")
    assert axes_of(block.mlp.W_w) == ("rank", None, "mlp")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(d_model=0, d_ff=4), r"NPTMLPConfig.d_model must be a positive int, got 0"),
        (dict(d_model=4, d_ff=4, rank=2.5), r"NPTMLPConfig.rank must be a positive int, got 2.5"),
        (dict(d_model=4, d_ff=4, k=True), r"NPTMLPConfig.k must be a positive int, got True"),
        (
            dict(d_model=4, d_ff=4, d_mod=-1),
            r"NPTMLPConfig.d_mod must be a positive int, got -1",
        ),
        (
            dict(d_model=4, d_ff=4, precision="bf16"),
            r"NPTMLPConfig.precision must be a MixedPrecision, got 'bf16'",
        ),
        (
            dict(d_model=4, d_ff=4, modulation="full"),
            r"NPTMLPConfig.modulation='full' is not one of",
        ),
        (
            dict(d_model=4, d_ff=4, rank_k_form="lazy"),
            r"NPTMLPConfig.rank_k_form='lazy' is not one of 'factored', 'vectors'",
        ),
        (
            dict(d_model=4, d_ff=4, mod_scale=float("nan")),
            r"NPTMLPConfig.mod_scale must be a finite number >= 0, got nan",
        ),
        (
            dict(d_model=4, d_ff=4, reg_lambda=-1.0),
            r"NPTMLPConfig.reg_lambda must be a finite number >= 0, got -1.0",
        ),
    ],
)
def test_mlp_config_errors_name_field_and_value(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        NPTMLPConfig(**kwargs)


def test_rank_k_regulariser_by_hand_in_both_forms():
    """aux = lambda * mean over tokens of (sum_k |u_k|^2 + sum_k |w_k|^2), checked on numbers."""
    for form in ("factored", "vectors"):
        cfg = NPTMLPConfig(
            d_model=2,
            d_ff=3,
            d_mod=1,
            modulation="rank_k",
            rank=1,
            k=1,
            reg_lambda=0.5,
            rank_k_form=form,
        )
        model = NPTMLP(cfg, rngs=nnx.Rngs(0))
        model.W_gen[...] = jnp.ones((1, 1))
        model.W_u[...] = jnp.array([[[1.0, 2.0]]])
        model.W_w[...] = jnp.array([[[1.0, 0.0, 1.0]]])
        a = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(2, 2, 1)  # r_t = a_t
        _, aux = model(jnp.zeros((2, 2, 2)), a)
        # |u_t|^2 = 5 a_t^2, |w_t|^2 = 2 a_t^2 -> 0.5 * mean(7 * [1, 4, 9, 16]) = 26.25
        assert float(aux) == pytest.approx(26.25, rel=1e-6), form


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(num_heads=0, head_dim=4), r"NPTBlockConfig.num_heads must be a positive int, got 0"),
        (dict(num_heads=2, head_dim=3), r"NPTBlockConfig.head_dim must be even for RoPE, got 3"),
        (
            dict(num_heads=2, head_dim=4, attn_residual=1),
            r"NPTBlockConfig.attn_residual must be a bool, got 1",
        ),
        (
            dict(num_heads=2, head_dim=4, mlp=NPTMLPConfig(d_model=8, d_ff=4, d_mod=6)),
            r"NPTBlockConfig.mlp.d_mod=6 must be None or d_model=8",
        ),
        (
            dict(
                num_heads=2,
                head_dim=4,
                attn_residual=False,
                mlp=NPTMLPConfig(d_model=8, d_ff=4, modulation="none"),
            ),
            r"attn_residual=False with mlp.modulation='none'",
        ),
        (
            dict(num_heads=2, head_dim=4, rope_theta=0.0),
            r"NPTBlockConfig.rope_theta must be a finite number > 0, got 0.0",
        ),
    ],
)
def test_block_config_errors_name_field_and_value(kwargs, pattern):
    kwargs.setdefault("mlp", NPTMLPConfig(d_model=8, d_ff=4))
    with pytest.raises(ValueError, match=pattern):
        NPTBlockConfig(**kwargs)


def test_mlp_bad_inputs_raise_named_value_errors():
    model = NPTMLP(NPTMLPConfig(d_model=D, d_ff=F, d_mod=DM, rank=R), rngs=nnx.Rngs(0))
    x, a = inputs(d_mod=DM)
    with pytest.raises(ValueError, match=r"a has shape \(2, 6, 8\) but expected \(B, S, 10\)"):
        model(x, x)
    with pytest.raises(ValueError, match=r"a has shape \(2, 5, 10\) but x gives S=6"):
        model(x, a[:, :5])
    with pytest.raises(ValueError, match=r"x has shape \(2, 6, 10\) but expected \(B, S, 8\)"):
        model(a, a)
    with pytest.raises(ValueError, match=r"a \(the modulating signal\) is required"):
        model(x)


@pytest.mark.parametrize("modulation", ["low_rank", "rank_k"])
def test_bf16_compute_is_close_to_fp32(modulation):
    cfg = NPTMLPConfig(d_model=64, d_ff=128, modulation=modulation, rank=R, k=K)
    m32 = NPTMLP(cfg, rngs=nnx.Rngs(3))
    m16 = NPTMLP(dataclasses.replace(cfg, precision=BF16), rngs=nnx.Rngs(3))
    enlarge(m32, 30.0)
    enlarge(m16, 30.0)
    x = jax.random.normal(jax.random.key(0), (Bn, S, 64))
    y32, _ = m32(x, x)
    y16, _ = m16(x, x)
    assert y16.dtype == jnp.bfloat16 and m16.W_gate[...].dtype == jnp.float32
    assert rel_err(y16.astype(jnp.float32), y32) <= 2e-2


def block_and_reference(attn_residual, seed=0):
    cfg = NPTBlockConfig(
        num_heads=2,
        head_dim=4,
        attn_residual=attn_residual,
        mlp=NPTMLPConfig(d_model=D, d_ff=F, rank=R),
    )
    block = NPTBlock(cfg, rngs=nnx.Rngs(seed))
    enlarge(block.mlp, 30.0)

    def reference(x):
        o = causal_attention(
            rms_norm(x, block.attn_norm[...]),
            block.W_q[...],
            block.W_k[...],
            block.W_v[...],
            block.W_o[...],
            jnp.arange(x.shape[1]),
            10000.0,
            jnp.float32,
        )
        h = x + o if attn_residual else x
        y, aux = block.mlp(rms_norm(h, block.mlp_norm[...]), o)
        return h + y, o

    return block, reference


@pytest.mark.parametrize("attn_residual", [True, False])
def test_block_routes_attention_as_configured(attn_residual):
    block, reference = block_and_reference(attn_residual)
    x = jax.random.normal(jax.random.key(1), (Bn, S, D))
    out, aux = block(x)
    ref, o = reference(x)
    assert out.shape == x.shape and out.dtype == x.dtype and float(aux) == 0.0
    assert rel_err(out, ref) <= 1e-6
    # without the residual, attention changes the output only through the small Delta W_t
    x_plus_mlp = x + block.mlp(rms_norm(x, block.mlp_norm[...]), jnp.zeros_like(o))[0]
    gap = rel_err(out - x, x_plus_mlp - x)
    if attn_residual:
        assert gap > 0.1
    else:
        assert 0.0 < gap < 0.1


def test_block_without_attn_residual_trains_attention_through_modulation():
    block, _ = block_and_reference(attn_residual=False)
    graphdef, state = nnx.split(block, nnx.Param)
    x = jax.random.normal(jax.random.key(2), (Bn, S, D))

    def loss(state):
        return jnp.sum(nnx.merge(graphdef, state)(x)[0] ** 2)

    g = jax.jit(jax.grad(loss))(state)
    for name in ("W_q", "W_k", "W_v", "W_o", "attn_norm"):
        assert float(jnp.linalg.norm(g[name][...])) > 0.0, name


@pytest.mark.parametrize("attn_residual", [True, False])
def test_block_is_causal(attn_residual):
    block, _ = block_and_reference(attn_residual, seed=4)
    x = jax.random.normal(jax.random.key(3), (Bn, S, D))
    x2 = x.at[:, 4:].set(jax.random.normal(jax.random.key(5), (Bn, S - 4, D)))
    out, _ = block(x)
    out2, _ = block(x2)
    np.testing.assert_allclose(np.asarray(out[:, :4]), np.asarray(out2[:, :4]), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(out[:, 4:] - out2[:, 4:]))) > 1e-3


def test_causal_attention_matches_manual_softmax():
    ks = jax.random.split(jax.random.key(8), 5)
    H, E = 2, 4
    x = jax.random.normal(ks[0], (Bn, S, D))
    wq, wk, wv = (jax.random.normal(k, (D, H, E)) for k in ks[1:4])
    wo = jax.random.normal(ks[4], (H, E, D))
    pos = jnp.arange(S)
    out = causal_attention(x, wq, wk, wv, wo, pos, 10000.0, jnp.float32)
    q = rope(jnp.einsum("bsd,dhe->bshe", x, wq, precision=HI), pos)
    k = rope(jnp.einsum("bsd,dhe->bshe", x, wk, precision=HI), pos)
    v = jnp.einsum("bsd,dhe->bshe", x, wv, precision=HI)
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k, precision=HI) / math.sqrt(E)
    scores = jnp.where(jnp.tril(jnp.ones((S, S), bool)), scores, -jnp.inf)
    o = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(scores, -1), v, precision=HI)
    ref = jnp.einsum("bshe,hed->bsd", o, wo, precision=HI)
    assert rel_err(out, ref) <= 1e-5
