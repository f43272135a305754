"""Decoder LMs assembled from attention and TTT layers: config, presets, the model itself."""

# isort: skip_file
# (The banners group the index by topic; isort would sort the imports across them.)

# --- configuration and presets
from ttt_jax.models.config import ModelConfig
from ttt_jax.models.options import InPlaceOptions, LaCTOptions, NPTOptions, Shared, TTTOptions
from ttt_jax.models.presets import PRESETS, preset

# --- the registry of block parts: one entry per layer family
from ttt_jax.models.registry import FAMILIES, MIXERS, MLPS, Family

# --- the model
from ttt_jax.models.lm import LM, segment_positions

# --- counting (param counts, FLOPs for MFU)
from ttt_jax.models.counting import flops_per_token, param_counts

__all__ = [
    # configuration and presets
    "ModelConfig",
    "InPlaceOptions",
    "LaCTOptions",
    "NPTOptions",
    "Shared",
    "TTTOptions",
    "PRESETS",
    "preset",
    # the registry
    "FAMILIES",
    "MIXERS",
    "MLPS",
    "Family",
    # the model
    "LM",
    "segment_positions",
    # counting
    "flops_per_token",
    "param_counts",
]
