"""What every NNX layer shares: the mixed-precision policy and parameter creation with logical
axis names (with the projections of multi-head attention). The numerics (matmul, norms, GELU)
are the ops' own, `ttt_jax.ops.core.numerics`.

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

from ttt_jax.ops.core import check_float_dtype


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
        """`fp32` (everything fp32), `bf16` (fp32 params and state, bf16 compute) or `fp64`
        (everything float64: exactness tests, under `jax_enable_x64`)."""
        presets = {
            "fp32": cls(),
            "bf16": cls(compute_dtype=jnp.bfloat16),
            "fp64": cls(jnp.float64, jnp.float64, jnp.float64),
        }
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


def attention_projections(
    rngs: nnx.Rngs, d: int, heads: int, kv_heads: int, head_dim: int, dtype: jnp.dtype
) -> tuple[nnx.Param, nnx.Param, nnx.Param, nnx.Param]:
    """`(W_q [d, H, Dh], W_k [d, Hkv, Dh], W_v [d, Hkv, Dh], W_o [H, Dh, d])` of a multi-head
    attention (logical axes embed, heads, head_dim; W_o heads, head_dim, embed), drawn in that
    order from `N(0, 1 / fan_in)`."""
    axes = ("embed", "heads", "head_dim")
    std = d**-0.5
    return (
        param(rngs, normal(std), (d, heads, head_dim), axes, dtype),
        param(rngs, normal(std), (d, kv_heads, head_dim), axes, dtype),
        param(rngs, normal(std), (d, kv_heads, head_dim), axes, dtype),
        param(
            rngs,
            normal((heads * head_dim) ** -0.5),
            (heads, head_dim, d),
            ("heads", "head_dim", "embed"),
            dtype,
        ),
    )
