"""In-Place TTT memory (SPEC 3.3, 5): at d=2048, F=6144, C=1024, B=1, T=32768 (32 chunks) the
fwd+bwd of the op never holds per-chunk weights: its temporaries are a fraction of the
materialising formulation's (per-chunk deltas `[B, n_chunks, d, F]`, cumsum, einsum, the
official code's form) and grow with T like activations. Everything is compiled for CPU on
abstract shapes (`jax.ShapeDtypeStruct`): nothing is allocated.

Measured on CPU, jax 0.10.2, fp32 (temp bytes of `value_and_grad(sum(o * ct))` w.r.t. z,
target, w_down, w_target, conv_kernel, eta; one fp32 `[d, F]` is 50.3 MB, 32 of them 1.61 GB):

| form, T=32768 | fwd+bwd temp | vs materialising |
|---|---|---|
| materialising (per-chunk weights, cumsum) | 9.01 GB | 1 |
| `inplace_ttt` default (sequential, custom VJP) | 1.23 GB | 0.136 |
| `inplace_ttt` packed, 7 documents | 1.65 GB | 0.183 |
| `inplace_ttt` sequential, `backward="autodiff"` | 5.96 GB | 0.66 |
| `inplace_ttt` associative, custom VJP | 5.20 GB | 0.58 |

At T=8192 the default takes 0.42 GB and packed 0.65 GB (ratios 32768 / 8192: 2.9 and 2.6,
under the 4x of T itself). The associative prefix is parallel and shards over chunks but, by
nature, materialises per-chunk states in its forward (4.83 GB forward temp against 0.59 GB
sequential). Each compile takes about 0.2 to 1.5 s on 2 CPU cores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ttt_jax.ops.inplace.op import inplace_ttt
from ttt_jax.ops.inplace.targets import chunk_targets

Bn, D, F, C = 1, 2048, 6144, 1024
T_LONG, T_SHORT = 32768, 8192
GB = 1e9
ONE_WEIGHT = D * F * 4  # one fp32 [d, F]


def materialising(z, target, w_down, w_target, conv_kernel, eta):
    """The official code's form: every chunk's delta, an exclusive cumsum, per-chunk weights."""
    b, t, f = z.shape
    n = t // C
    zc = z.reshape(b, n, C, f)
    v = chunk_targets(target.reshape(b, n, C, -1), w_target, conv_kernel, "centered", z.dtype)
    deltas = jnp.einsum("bncd,bncf->bndf", v, zc)
    w = w_down[None, None] + eta * (jnp.cumsum(deltas, axis=1) - deltas)
    return jnp.einsum("bncf,bndf->bncd", zc, w).reshape(b, t, -1)


def packed_ids(t):
    """Documents every 5000 tokens: chunk edges never on the grid of C."""
    return (jnp.arange(t, dtype=jnp.int32) // 5000)[None]


def op(packed=False, **kw):
    def fn(z, target, w_down, w_target, conv_kernel, eta):
        seg = packed_ids(z.shape[1]) if packed else None
        return inplace_ttt(
            z,
            target,
            w_down=w_down,
            w_target=w_target,
            conv_kernel=conv_kernel,
            eta=eta,
            chunk_size=C,
            segment_ids=seg,
            **kw,
        )[0]

    return fn


FORMS = {
    "materialising": materialising,
    "default": op(),
    "packed": op(packed=True),
    "autodiff": op(backward="autodiff"),
    "associative": op(prefix="associative"),
}


def abstract_args(t):
    s = jax.ShapeDtypeStruct
    f32 = jnp.float32
    return (
        s((Bn, t, F), f32),
        s((Bn, t, D), f32),
        s((D, F), f32),
        s((D, D), f32),
        s((5, D), f32),
        s((), f32),
    )


@functools.cache
def fwd_bwd_temp(form: str, t: int) -> int:
    fn = FORMS[form]

    def step(*args):
        *inputs, ct = args
        return jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=range(6))(*inputs)

    args = (*abstract_args(t), jax.ShapeDtypeStruct((Bn, t, D), jnp.float32))
    return jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes


@functools.cache
def fwd_temp(form: str, t: int) -> int:
    compiled = jax.jit(FORMS[form]).lower(*abstract_args(t)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_the_materialising_baseline_holds_per_chunk_weights():
    assert fwd_bwd_temp("materialising", T_LONG) >= 3 * (T_LONG // C) * ONE_WEIGHT


def test_fwd_bwd_temp_is_below_a_quarter_of_the_materialising_form():
    base = fwd_bwd_temp("materialising", T_LONG)
    for form in ("default", "packed"):
        temp = fwd_bwd_temp(form, T_LONG)
        assert temp < 0.25 * base, (form, temp / GB, base / GB)
    # Fewer bytes than the per-chunk weights alone, let alone their cotangents.
    assert fwd_bwd_temp("default", T_LONG) < (T_LONG // C) * ONE_WEIGHT


def test_fwd_bwd_temp_grows_no_faster_than_t():
    for form in ("default", "packed"):
        short, long = fwd_bwd_temp(form, T_SHORT), fwd_bwd_temp(form, T_LONG)
        assert long <= (T_LONG / T_SHORT) * short, (form, short / GB, long / GB)


def test_the_custom_backward_is_what_saves_the_memory():
    # Autodiff of the same scan keeps the carried [B, d, F] state of every chunk.
    assert fwd_bwd_temp("autodiff", T_LONG) >= (T_LONG // C) * ONE_WEIGHT
    assert fwd_bwd_temp("default", T_LONG) < 0.5 * fwd_bwd_temp("autodiff", T_LONG)


def test_the_associative_prefix_trades_memory_for_parallelism_in_its_forward():
    n = T_LONG // C
    assert fwd_temp("associative", T_LONG) >= 2 * n * ONE_WEIGHT
    assert fwd_temp("default", T_LONG) < n * ONE_WEIGHT
