"""JAX-only unit tests. Strict dtype promotion is not forced globally (flax and optax
promote internally); the ops' own dtype rules are asserted test by test.

Layout and imports (the convention for every test file):
- The tree mirrors the package: `tests/ops/core/`, `tests/ops/ttt/`, `tests/ops/lact/`,
  `tests/ops/inplace/`, `tests/ops/npt/`, `tests/layers/`, `tests/models/`, `tests/memory/`,
  `tests/train/`, `tests/data/`, `tests/convert/`; tests of a top-level module of `ttt_jax`
  (`__init__`, `cli`) sit in `tests/` itself.
- Every folder is a package (an empty `__init__.py`) and pytest imports test files with
  `--import-mode=importlib` under their dotted path (`tests.ops.ttt.test_ttt_ops`), so two files
  may share a basename. Only the repository root is on sys.path (`pythonpath = ["."]` in
  pyproject.toml).
- Shared helpers live in `tests/` and are imported by their full name:
  `from tests.memory_helpers import run_fast`, `from tests._train_helpers import ROOT`. Never
  import one test file from another: shared inputs and constants go into a helper module (or
  `ttt_jax.testing`, e.g. `rel_err`).
- Scripts run in a subprocess (`tests/_sharded_check.py`) are found from `_train_helpers.ROOT`,
  the repository root, never from `__file__` depth of the calling test.
"""

import contextlib
import os

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_promotion():
    mode = os.environ.get("TTT_STRICT_PROBE", "")
    if not mode:
        yield
        return
    with contextlib.ExitStack() as stack:
        if mode in ("1", "dtype"):
            stack.enter_context(jax.numpy_dtype_promotion("strict"))
        if mode in ("1", "rank"):
            stack.enter_context(jax.numpy_rank_promotion("raise"))
        yield
