"""Parity tests: JAX vs the torch reference on the same random inputs (SPEC 5).

Tests marked `gpu` compare bf16 JAX on a GPU with the fp32 reference; elsewhere they skip.
"""

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (jax.default_backend() != 'gpu')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
