"""Decoder LMs assembled from attention and TTT layers: config, presets, the model itself, and
generation."""

# isort: skip_file
# (The banners group the index by topic; isort would sort the imports across them.)

# --- configuration and presets
from ttt_jax.models.config import ModelConfig
from ttt_jax.models.options import (
    AttentionOptions,
    InPlaceOptions,
    LaCTOptions,
    NPTOptions,
    Shared,
    TTTOptions,
)
from ttt_jax.models.presets import PRESETS, preset

# --- the registry of block parts: one entry per layer family
from ttt_jax.models.registry import FAMILIES, MIXERS, MLPS, Family

# --- the model
from ttt_jax.models.lm import LM, LMCache, segment_positions

# --- generation (decoding through every layer's cache)
from ttt_jax.models.generate import generate

# --- counting (param counts, FLOPs for MFU)
from ttt_jax.models.counting import flops_per_token, param_counts

__all__ = [
    # configuration and presets
    "ModelConfig",
    "AttentionOptions",
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
    "LMCache",
    "segment_positions",
    # generation
    "generate",
    # counting
    "flops_per_token",
    "param_counts",
]
