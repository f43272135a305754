"""Flax NNX layers: own the parameters, projections and norms; call `ttt_jax.ops`."""

from ttt_jax.layers.common import BF16, FP32, MixedPrecision
from ttt_jax.layers.ttt_layer import TTTCache, TTTConfig, TTTLayer, TTTLinear, TTTMLP

__all__ = [
    "BF16",
    "FP32",
    "MixedPrecision",
    "TTTCache",
    "TTTConfig",
    "TTTLayer",
    "TTTLinear",
    "TTTMLP",
]
