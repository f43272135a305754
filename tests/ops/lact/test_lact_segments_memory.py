"""Memory of LaCT fwd+bwd with packed documents, judged by the compiler on abstract shapes
(nothing allocated). Measured (CPU, jaxlib 0.10.2, B=1, H=2, D=Dh=64, C=256, bf16 q/k/v, temp
MiB at T=2048 / 8192):

| backward | unsegmented | packed |
|---|---|---|
| custom | 9.0 / 25.5 | 14.4 / 43.6 |
| custom, checkpoint_group=4 | 8.7 / 21.8 | 14.1 / 39.1 |
| autodiff | 32.7 / 123.4 | 51.7 / 186.6 |
| autodiff, checkpoint_group=4 | 23.0 / 36.3 | 39.0 / 76.4 |

So packing costs a few token-sized buffers (the slot indices, the short-document reads, the
scattered outputs), linear in T, about 1.7x the unsegmented custom backward's temporaries and
1.5-2.1x autodiff's; the custom backward stays the lean one and checkpoint groups still cut
autodiff's memory. Layout-independent: the shapes are static whatever the documents are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from ttt_jax.ops import lact_swiglu

B, H, D, C = 1, 2, 64, 256


@functools.cache
def temp_mib(t: int, packed: bool, backward: str, group: int | None) -> float:
    def loss(q, k, v, lr0, lr1, lr2, beta, w0, w1, w2, seg):
        o, _ = lact_swiglu(
            q, k, v, lr0, lr1, lr2, momentum=beta, w0=w0, w1=w1, w2=w2, chunk_size=C,
            segment_ids=seg, backward=backward, checkpoint_group=group,
        )  # fmt: skip
        return jnp.sum(o.astype(jnp.float32))

    sds = jax.ShapeDtypeStruct
    args = (
        *[sds((B, t, H, D), jnp.bfloat16)] * 3,
        *[sds((B, t, H), jnp.float32)] * 4,
        *[sds((H, D, D), jnp.float32)] * 3,
        sds((B, t), jnp.int32) if packed else None,
    )
    compiled = jax.jit(jax.grad(loss, argnums=tuple(range(10)))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


@pytest.mark.slow
def test_packed_memory_is_linear_in_t_and_near_the_unsegmented_path():
    custom = {t: temp_mib(t, True, "custom", None) for t in (2048, 8192)}
    assert custom[8192] <= 1.1 * 4 * custom[2048], custom
    assert custom[8192] <= 2.0 * temp_mib(8192, False, "custom", None), custom
    autodiff = {g: temp_mib(8192, True, "autodiff", g) for g in (None, 4)}
    assert autodiff[4] <= 0.5 * autodiff[None], autodiff
    # The custom backward keeps chunk-boundary states only, with documents as without.
    assert custom[8192] <= 0.3 * autodiff[None], (custom, autodiff)
