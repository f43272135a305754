"""Memory of TTT-Linear fwd+bwd judged by the compiler on abstract shapes (nothing allocated).

Issue 2: at B=1, T=8192, H=12, D=64, C=16, temp memory with checkpoint_group=4 is at most 40%
of no remat, and temp memory grows at most linearly in T.
"""

import jax
import jax.numpy as jnp
import pytest

from ttt_jax.ops import ttt_linear

B, H, D, C = 1, 12, 64, 16


def fwd_bwd_temp_bytes(t: int, checkpoint_group, dtype=jnp.float32) -> int:
    def sds(shape, dt=dtype):
        return jax.ShapeDtypeStruct(shape, dt)

    def loss(q, k, v, eta, w1, b1, s, b):
        o, _ = ttt_linear(
            q,
            k,
            v,
            eta,
            W1=w1,
            b1=b1,
            ln_scale=s,
            ln_bias=b,
            mini_batch_size=C,
            checkpoint_group=checkpoint_group,
        )
        return jnp.sum(o.astype(jnp.float32))

    f32 = jnp.float32
    args = (
        sds((B, t, H, D)),
        sds((B, t, H, D)),
        sds((B, t, H, D)),
        sds((B, t, H), f32),
        sds((H, D, D), f32),
        sds((H, D), f32),
        sds((H, D), f32),
        sds((H, D), f32),
    )
    compiled = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def temps():
    return {(t, g): fwd_bwd_temp_bytes(t, g) for t in (2048, 8192) for g in (None, 4)}


def test_checkpoint_group_4_at_most_40_percent(temps):
    ratio = temps[(8192, 4)] / temps[(8192, None)]
    print(
        f"temp bytes: no remat {temps[(8192, None)]:,}, G=4 {temps[(8192, 4)]:,}, ratio {ratio:.3f}"
    )
    assert ratio <= 0.40


@pytest.mark.parametrize("group", [None, 4])
def test_temp_grows_at_most_linearly(temps, group):
    assert temps[(8192, group)] <= 4 * temps[(2048, group)]
