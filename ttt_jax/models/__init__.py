"""Decoder LMs assembled from attention and TTT layers: config, presets, the model itself."""

# --- configuration and presets
from ttt_jax.models.config import ModelConfig

# --- counting (param counts, FLOPs for MFU)
from ttt_jax.models.counting import flops_per_token, param_counts

# --- the model
from ttt_jax.models.lm import LM, segment_positions
from ttt_jax.models.presets import PRESETS, preset

# --- the registry of block parts
from ttt_jax.models.registry import MIXERS, MLPS

__all__ = [
    "LM",
    "MIXERS",
    "MLPS",
    "PRESETS",
    "ModelConfig",
    "flops_per_token",
    "param_counts",
    "preset",
    "segment_positions",
]
