"""LaCT (SPEC 3.2): large-chunk SwiGLU fast weights with momentum, Muon and weight norm."""

from ttt_jax.ops.core.checks import BACKWARDS
from ttt_jax.ops.lact.math import NAMES
from ttt_jax.ops.lact.op import LaCTState, lact_low_rank_weight, lact_swiglu

__all__ = ["BACKWARDS", "NAMES", "LaCTState", "lact_low_rank_weight", "lact_swiglu"]
