"""What every NNX layer shares: the mixed-precision policy and parameter creation with logical
axis names.

Logical axis names used across the project (the training config maps them to mesh axes):
`embed` (model width), `heads` (attention / TTT heads), `head_dim`, `qkv` (a flattened
`heads * head_dim` projection width), `mlp` (MLP hidden width), `vocab`, `conv` (conv taps),
`chunk` (positions within a mini-batch), `rank` (low-rank factors). `None` leaves an axis
replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.ops.core import check_float_dtype, wide_dtype


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
    """Dtypes a layer uses (SPEC 4): parameters, matmul compute, and fast-weight state.

    Fast-weight state and all norms stay fp32 whatever the compute dtype: their updates are
    small differences of large numbers, which bf16 would round away.
    """

    param_dtype: jnp.dtype = jnp.float32
    compute_dtype: jnp.dtype = jnp.float32
    state_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "state_dtype"):
            check_float_dtype(f"MixedPrecision.{field}", getattr(self, field))

    @classmethod
    def named(cls, name: str) -> MixedPrecision:
        """`fp32` (everything fp32) or `bf16` (fp32 params and state, bf16 compute)."""
        presets = {"fp32": cls(), "bf16": cls(compute_dtype=jnp.bfloat16)}
        if name not in presets:
            raise ValueError(f"precision={name!r} is not one of {sorted(presets)}")
        return presets[name]


FP32 = MixedPrecision()
BF16 = MixedPrecision(compute_dtype=jnp.bfloat16)


def param(
    rngs: nnx.Rngs,
    init: Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array],
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """A parameter with logical axis names (one per dim) as sharding metadata.

    Eager sharding is off: layers are built outside any mesh; the trainer shards the state by
    mapping these names to mesh axes.
    """
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} must name every dim of shape {tuple(shape)}")
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False
    )


def normal(std: float):
    """An initializer `N(0, std^2)`."""
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def zeros(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def dense(x: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
    """`x @ w` over the last axis of x, in the compute dtype with fp32 accumulation.

    The result is returned in the compute dtype: activations between layers are stored at
    compute precision, which is what halves activation memory under bf16. An fp64 compute dtype
    (tests under `jax_enable_x64`) accumulates in fp64.
    """
    y = jnp.einsum(
        "...i,io->...o",
        x.astype(compute_dtype),
        w.astype(compute_dtype),
        preferred_element_type=wide_dtype(compute_dtype),
    )
    return y.astype(compute_dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis, computed in fp32, returned in fp32."""
    x = x.astype(jnp.float32)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(
        jnp.float32
    )


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm over the last axis, computed and returned in fp32 (fp64 for fp64 x)."""
    dtype = wide_dtype(x.dtype)
    x = x.astype(dtype)
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps) * scale.astype(dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)
