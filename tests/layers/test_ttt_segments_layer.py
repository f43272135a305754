"""TTT layers with packed documents: the convs, RoPE positions and fast weights restart at each
document, so a packed row gives each document the layer's outputs alone; one document is the
plain call bit for bit; decode rejects segment_ids; bad ids are ValueErrors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers import TTTConfig, TTTLayer
from ttt_jax.testing import rel_err

C, WIDTH = 4, 32
LAYOUTS = ((3, 9, 1, 2, 8), (5, 4, 1, 1, 12))  # T = 23 per row
T = 23


def layer_of(backbone, inner):
    config = TTTConfig(
        d_model=WIDTH, num_heads=4, inner=inner, mini_batch_size=C, backbone=backbone
    )
    return TTTLayer(config, rngs=nnx.Rngs(0))


def jitted(layer):
    """`layer(x, segment_ids)` under `jax.jit` (eager layer calls dispatch op by op: slow)."""
    graphdef, params = nnx.split(layer)
    f = jax.jit(lambda p, x, seg: nnx.merge(graphdef, p)(x, segment_ids=seg))
    return lambda x, segment_ids=None: f(params, x, segment_ids)


def segment_ids():
    rows = [np.repeat(np.arange(len(ls)), ls) + 10 * r for r, ls in enumerate(LAYOUTS)]
    return jnp.asarray(np.stack(rows), jnp.int32)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_packed_row_equals_documents_alone(backbone, inner):
    layer = jitted(layer_of(backbone, inner))
    x = jax.random.normal(jax.random.PRNGKey(1), (len(LAYOUTS), T, WIDTH))
    y = layer(x, segment_ids=segment_ids())
    # Every document as its own sample, zero-padded at the end: the layer is causal, so the
    # padding leaves the document's outputs as they are alone.
    spans = [
        (r, a, a + n)
        for r, ls in enumerate(LAYOUTS)
        for a, n in zip(np.cumsum((0, *ls[:-1])), ls, strict=True)
    ]
    width = max(b - a for _, a, b in spans)
    xd = jnp.stack([jnp.pad(x[r, a:b], [(0, width - b + a), (0, 0)]) for r, a, b in spans])
    y_alone = layer(xd)
    worst = max(rel_err(y[r, a:b], y_alone[i, : b - a]) for i, (r, a, b) in enumerate(spans))
    print(f"{backbone} {inner}: worst document {worst:.2e}")
    assert worst <= 1e-5


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_one_document_is_the_plain_call_bit_for_bit(inner):
    layer = jitted(layer_of("mamba", inner))
    x = jax.random.normal(jax.random.PRNGKey(2), (2, T, WIDTH))
    y = layer(x)
    y_one = layer(x, segment_ids=jnp.ones((2, T), jnp.int32))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_one))


def test_decode_rejects_segment_ids():
    layer = layer_of("mamba", "linear")
    x = jnp.zeros((1, 5, WIDTH))
    with pytest.raises(ValueError, match="decode streams one document"):
        layer.decode(x, layer.init_cache(1), segment_ids=jnp.zeros((1, 5), jnp.int32))


@pytest.mark.parametrize(
    "seg, message",
    [
        (jnp.zeros((1, 6), jnp.int32), "segment_ids"),
        (jnp.zeros((2, 5), jnp.int32), "segment_ids"),
        (jnp.zeros((1, 5), jnp.float32), "segment_ids must have an integer dtype"),
    ],
)
def test_bad_segment_ids_name_the_argument(seg, message):
    layer = layer_of("mamba", "linear")
    with pytest.raises(ValueError, match=message):
        layer(jnp.zeros((1, 5, WIDTH)), segment_ids=seg)
