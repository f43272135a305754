"""Bad op and layer inputs raise a ValueError naming the argument before anything is traced
(`ttt_jax.ops.core.checks`): a non-floating `state_dtype`, an empty batch or sequence, an
`initial_state` or decode cache of the wrong type or batch, non-finite rates and RoPE bases, a
`save_names:` policy naming a tag the op does not set, and integer layer inputs (every layer
rejects them; none casts silently)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ttt_jax import layers as L
from ttt_jax.layers.attention import Attention, AttentionConfig
from ttt_jax.ops.inplace import inplace_ttt
from ttt_jax.ops.lact import lact_swiglu
from ttt_jax.ops.npt import npt_generated_rank_k_linear, npt_modulated_linear, npt_rank_k_linear
from ttt_jax.ops.rope import rope
from ttt_jax.ops.ttt import TTTLinearState, ttt_linear, ttt_mlp

B, T, H, D = 2, 8, 2, 4


def r(*shape):
    return jax.random.normal(jax.random.key(sum(shape)), shape)


def linear(b=B, t=T, **kw):
    args = dict(W1=r(H, D, D), b1=r(H, D), ln_scale=r(H, D), ln_bias=r(H, D), mini_batch_size=4)
    return ttt_linear(r(b, t, H, D), r(b, t, H, D), r(b, t, H, D), r(b, t, H), **{**args, **kw})


def mlp(b=B, t=T, **kw):
    args = dict(W1=r(H, D, 4 * D), b1=r(H, 4 * D), W2=r(H, 4 * D, D), b2=r(H, D),
                ln_scale=r(H, D), ln_bias=r(H, D), mini_batch_size=4)  # fmt: skip
    return ttt_mlp(r(b, t, H, D), r(b, t, H, D), r(b, t, H, D), r(b, t, H), **{**args, **kw})


def lact(b=B, t=T, **kw):
    x = r(b, t, H, D)
    rates = [jnp.abs(r(b, t, H)) for _ in range(3)]
    return lact_swiglu(x, x, x, *rates, w0=r(H, D, D), w1=r(H, D, D), w2=r(H, D, D),
                       chunk_size=4, **kw)  # fmt: skip


def inplace(b=B, t=T, **kw):
    args = dict(w_down=r(4, 8), w_target=r(4, 4), conv_kernel=r(5, 4), eta=0.1, chunk_size=4)
    return inplace_ttt(r(b, t, 8), r(b, t, 4), **{**args, **kw})


OP_CASES = [
    ("ttt_linear state_dtype int32", lambda: linear(state_dtype=jnp.int32), "state_dtype must be a float"),
    ("ttt_mlp state_dtype int32", lambda: mlp(state_dtype=jnp.int32), "state_dtype must be a float"),
    ("ttt_linear T=0", lambda: linear(t=0), r"q has shape \(2, 0, 2, 4\): its T axis"),
    ("ttt_linear B=0", lambda: linear(b=0), r"q has shape \(0, 8, 2, 4\): its B axis"),
    ("ttt_mlp T=0", lambda: mlp(t=0), "q has shape .*: its T axis"),
    ("ttt_mlp B=0", lambda: mlp(b=0), "q has shape .*: its B axis"),
    ("lact T=0", lambda: lact(t=0), "q has shape .*: its T axis"),
    ("lact B=0", lambda: lact(b=0), "q has shape .*: its B axis"),
    ("inplace T=0", lambda: inplace(t=0), "z has shape .*: its T axis"),
    ("inplace B=0", lambda: inplace(b=0), "z has shape .*: its B axis"),
    ("npt T=0", lambda: npt_modulated_linear(r(2, 0, 4), r(2, 0, 2), W=r(4, 8), A=r(4, 2), B=r(2, 8)),
     "h has shape .*: its S axis"),
    ("npt rank-k B=0", lambda: npt_rank_k_linear(r(0, 3, 4), r(0, 3, 2, 4), r(0, 3, 2, 8), W=r(4, 8)),
     "h has shape .*: its B axis"),
    ("npt generated T=0", lambda: npt_generated_rank_k_linear(
        r(1, 0, 4), r(1, 0, 3), W=r(4, 8), W_u=r(3, 2, 4), W_w=r(3, 2, 8)), "its S axis"),
    ("ttt_linear initial_state dict", lambda: linear(initial_state={"W1": r(B, H, D, D), "b1": r(B, H, D)}),
     "initial_state must be TTTLinearState .*got dict"),
    ("ttt_linear initial_state tuple", lambda: linear(initial_state=(r(B, H, D, D), r(B, H, D))),
     "initial_state must be TTTLinearState .*got tuple"),
    ("ttt_mlp initial_state of ttt_linear", lambda: mlp(initial_state=TTTLinearState(W1=r(B, H, D, D), b1=r(B, H, D))),
     "initial_state must be TTTMLPState .*got TTTLinearState"),
    ("inplace initial_state dict", lambda: inplace(initial_state={"w_down": r(B, 4, 8)}),
     "initial_state must be InPlaceState"),
    ("inplace eta nan", lambda: inplace(eta=float("nan")), "eta must be a finite number, got nan"),
    ("inplace eta inf array", lambda: inplace(eta=jnp.array(jnp.inf)), "eta must be a finite number, got inf"),
    ("ttt_linear save_names", lambda: linear(checkpoint_group=1, remat_policy="save_names:nonexistent"),
     "names 'nonexistent', which ttt_linear / ttt_mlp does not tag .*ttt_z, ttt_grad, ttt_z_bar"),
    ("ttt_mlp offload_names", lambda: mlp(checkpoint_group=1, remat_policy="offload_names:ttt_z,zzz"),
     "names 'zzz'"),
    ("lact save_names", lambda: lact(checkpoint_group=1, backward="autodiff", remat_policy="save_names:nonexistent"),
     "which lact_swiglu does not tag .*lact_grad, lact_hidden"),
    ("inplace save_names", lambda: inplace(checkpoint_group=1, backward="autodiff", remat_policy="save_names:ttt_z"),
     "names 'ttt_z', which inplace_ttt does not tag .*inplace_delta"),
    ("rope theta -1", lambda: rope(r(1, 4, 1, 4), jnp.arange(4), -1.0), "theta must be a finite number > 0"),
    ("rope theta inf", lambda: rope(r(1, 4, 1, 4), jnp.arange(4), float("inf")), "theta must be a finite"),
]  # fmt: skip


@pytest.mark.parametrize("call,message", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_bad_op_inputs_raise_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_checks_let_valid_calls_through():
    """Same calls with good values run; `eta` stays differentiable (a traced eta is not read)."""
    assert linear(checkpoint_group=1, remat_policy="save_names:ttt_z,ttt_grad")[0].shape == (
        B,
        T,
        H,
        D,
    )
    assert mlp(state_dtype=jnp.bfloat16)[0].shape == (B, T, H, D)
    assert lact(checkpoint_group=1, backward="autodiff", remat_policy="save_names:lact_grad")[0].shape == (B, T, H, D)  # fmt: skip
    grad = jax.grad(lambda e: inplace(eta=e, backward="autodiff")[0].sum())
    assert jnp.isfinite(grad(0.1)) and jnp.isfinite(jax.jit(grad)(0.1))
    assert rope(r(1, 4, 1, 4), jnp.arange(4), jnp.float32(500.0)).shape == (1, 4, 1, 4)


def small_layers():
    rngs = nnx.Rngs(0)
    ttt = L.TTTLinear(L.TTTConfig(d_model=8, num_heads=2, mini_batch_size=4), rngs=rngs)
    lact_cfg = L.LaCTConfig(d_model=8, num_heads=2, num_fw_heads=2, rank=2, chunk_size=4, window=4)
    inpl = L.InPlaceMLP(
        L.InPlaceMLPConfig(d_model=8, d_ff=16, chunk_size=4, target_source="input"), rngs=rngs
    )
    npt = L.NPTMLP(L.NPTMLPConfig(d_model=8, d_ff=16), rngs=rngs)
    return ttt, L.LaCTLayer(lact_cfg, rngs=rngs), inpl, npt


def test_bad_layer_inputs_raise_naming_the_argument():
    ttt, lact_layer, inpl, npt = small_layers()
    attn = Attention(AttentionConfig(d_model=8, num_heads=2, head_dim=4), rngs=nnx.Rngs(0))
    ints = jnp.ones((1, 4, 8), jnp.int32)
    with pytest.raises(ValueError, match="x must have a floating dtype, got int32"):
        attn(ints)
    a = jnp.ones((1, 4, npt.config.mod_width))
    for call in (lambda: ttt(ints), lambda: lact_layer(ints), lambda: inpl(ints),
                 lambda: npt(ints, a), lambda: ttt.decode(ints)):  # fmt: skip
        with pytest.raises(ValueError, match="x must have a floating dtype, got int32"):
            call()
    for layer in (ttt, lact_layer, inpl):
        with pytest.raises(ValueError, match=r"x has shape \(1, 0, 8\): its T axis"):
            layer(jnp.ones((1, 0, 8)))
        with pytest.raises(ValueError, match=r"x has shape \(0, 4, 8\): its B axis"):
            layer(jnp.ones((0, 4, 8)))
    x = jnp.ones((2, 1, 8))
    for layer in (ttt, lact_layer, inpl):
        with pytest.raises(ValueError, match="cache holds a batch of 3 but x has batch 2"):
            layer.decode(x, layer.init_cache(3))
    for layer, cls in ((ttt, "TTTCache"), (lact_layer, "LaCTCache"), (inpl, "InPlaceCache")):
        with pytest.raises(ValueError, match=f"cache must be {cls}, got dict"):
            layer.decode(x, {"q": x})
    assert ttt.decode(x, ttt.init_cache(2))[0].shape == (2, 1, 8)  # the right cache works


CONFIG_CASES = [
    (lambda: L.TTTConfig(d_model=8, num_heads=2, base_lr=float("inf")), "TTTConfig.base_lr must be a finite number"),
    (lambda: L.TTTConfig(d_model=8, num_heads=2, rope_theta=-1.0), "TTTConfig.rope_theta must be a finite number > 0"),
    (lambda: L.TTTConfig(d_model=8, num_heads=2, checkpoint_group=1, remat_policy="save_names:nonexistent"),
     "TTTConfig.remat_policy='save_names:nonexistent' names 'nonexistent'"),
    (lambda: L.LaCTConfig(d_model=8, num_heads=2, num_fw_heads=2, rank=2, checkpoint_group=1,
                          remat_policy="save_names:ttt_z"), "LaCTConfig.remat_policy='save_names:ttt_z'"),
    (lambda: L.InPlaceMLPConfig(d_model=8, d_ff=16, checkpoint_group=1, remat_policy="save_names:lact_grad"),
     "names 'lact_grad', which the In-Place TTT op does not tag"),
]  # fmt: skip


@pytest.mark.parametrize("make,message", CONFIG_CASES)
def test_bad_layer_configs_raise_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()
