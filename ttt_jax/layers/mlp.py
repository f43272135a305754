"""The plain SwiGLU MLP of every baseline block:

    y = (silu(x W_gate) * (x W_up)) W_down

Parameters (logical axes): `W_gate, W_up: [d, F]` (embed, mlp), `W_down: [F, d]` (mlp, embed),
initialised `N(0, 1/fan_in)`. The projections run in the compute dtype with fp32 accumulation and
are stored in the compute dtype; silu and the product run in fp32.

`swiglu_params` and `swiglu_down` are shared with the NPT MLP, which has the same parameters and
the same computation after its gate projection (its gate is modulated per token).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from ttt_jax.layers.common import FP32, MixedPrecision, normal, param
from ttt_jax.ops.core import check_layer_input, check_positive_int, check_shapes, matmul, wide_dtype


@dataclasses.dataclass(frozen=True)
class SwiGLUConfig:
    """Shape and precision of a SwiGLU MLP.

    Attributes:
      d_model: d, width of the MLP input and output.
      d_ff: F, hidden width.
      precision: the mixed-precision policy.
    """

    d_model: int
    d_ff: int
    precision: MixedPrecision = FP32

    def __post_init__(self):
        check_positive_int("SwiGLUConfig.d_model", self.d_model)
        check_positive_int("SwiGLUConfig.d_ff", self.d_ff)
        if not isinstance(self.precision, MixedPrecision):
            raise ValueError(
                f"SwiGLUConfig.precision must be a MixedPrecision, got {self.precision!r}"
            )


def swiglu_params(rngs: nnx.Rngs, d: int, f: int, dtype) -> tuple[nnx.Param, ...]:
    """`(W_gate, W_up, W_down)`, created in this order (the order fixes their random draws)."""
    return (
        param(rngs, normal(d**-0.5), (d, f), ("embed", "mlp"), dtype),
        param(rngs, normal(d**-0.5), (d, f), ("embed", "mlp"), dtype),
        param(rngs, normal(f**-0.5), (f, d), ("mlp", "embed"), dtype),
    )


def swiglu_down(
    x: jax.Array, gate: jax.Array, w_up: jax.Array, w_down: jax.Array, compute_dtype
) -> jax.Array:
    """`(silu(gate) * (x W_up)) W_down`: the MLP after its gate projection.

    Args:
      x: `[B, S, d]` MLP input in the compute dtype.
      gate: `[B, S, F]` the gate projection's output.
      w_up: `[d, F]`; w_down: `[F, d]`.
      compute_dtype: dtype of the matmuls (fp32 accumulation) and of the result.

    Returns:
      `[B, S, d]` in the compute dtype.
    """
    cd = compute_dtype
    up = matmul("...d,df->...f", x, w_up, cd).astype(cd)
    w = wide_dtype(cd)  # the gate's nonlinearity in fp32 under bf16, fp64 under fp64
    z = (jax.nn.silu(gate.astype(w)) * up.astype(w)).astype(cd)
    return matmul("...f,fd->...d", z, w_down, cd).astype(cd)


class SwiGLU(nnx.Module):
    """SwiGLU MLP `[B, S, d] -> [B, S, d]` (module docstring)."""

    def __init__(self, config: SwiGLUConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        pd = c.precision.param_dtype
        self.W_gate, self.W_up, self.W_down = swiglu_params(rngs, c.d_model, c.d_ff, pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the MLP to `x: [B, S, d]` (already normalised by the block).

        Returns:
          `y: [B, S, d]` in the compute dtype.
        """
        c, cd = self.config, self.config.precision.compute_dtype
        check_shapes([("x", x, ("B", "S", c.d_model))])
        check_layer_input(x, c.d_model)
        x = x.astype(cd)
        gate = matmul("bsd,df->bsf", x, self.W_gate[...], cd).astype(cd)
        return swiglu_down(x, gate, self.W_up[...], self.W_down[...], cd)
