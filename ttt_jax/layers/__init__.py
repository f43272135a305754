"""Flax NNX layers: own the parameters, projections and norms; call `ttt_jax.ops`."""

from ttt_jax.layers.common import BF16, FP32, MixedPrecision
from ttt_jax.layers.inplace_mlp import InPlaceCache, InPlaceMLP, InPlaceMLPConfig
from ttt_jax.layers.lact import LaCTCache, LaCTConfig, LaCTLayer
from ttt_jax.layers.npt_block import NPTBlock, NPTBlockConfig
from ttt_jax.layers.npt_mlp import NPTMLP, NPTMLPConfig
from ttt_jax.layers.ttt_layer import TTTMLP, TTTCache, TTTConfig, TTTLayer, TTTLinear

__all__ = [
    "BF16",
    "FP32",
    "InPlaceCache",
    "InPlaceMLP",
    "InPlaceMLPConfig",
    "LaCTCache",
    "LaCTConfig",
    "LaCTLayer",
    "MixedPrecision",
    "NPTBlock",
    "NPTBlockConfig",
    "NPTMLP",
    "NPTMLPConfig",
    "TTTCache",
    "TTTConfig",
    "TTTLayer",
    "TTTLinear",
    "TTTMLP",
]
