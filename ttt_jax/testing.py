"""Helpers for tests (this package's and users' own): the error measure of SPEC 5."""

from __future__ import annotations

import numpy as np

# Tolerances of SPEC 5, never loosened to make a test pass.
OP_TOL = 1e-5
LAYER_TOL = 1e-4
GPU_BF16_TOL = 2e-2


def rel_err(a, b) -> float:
    """`||a - b|| / ||b||` in float64 (Frobenius norm over all elements)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def micro_model(**overrides):
    """A `ModelConfig` that compiles in seconds on a CPU, for tests: vocab 64, 2 blocks of
    d_model 32 (2 heads, SwiGLU d_ff 64), fp32, TTT mini-batches of 8 neither unrolled nor
    rematerialised, the default pattern (attention and TTT-Linear); `overrides` replace fields.
    """
    from ttt_jax.models import ModelConfig, TTTOptions

    fields = dict(
        vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, precision="fp32",
        ttt=TTTOptions(mini_batch_size=8, unroll=1, checkpoint_group=None),
    )  # fmt: skip
    return ModelConfig(**{**fields, **overrides})
