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
