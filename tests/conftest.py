"""JAX-only unit tests: the layout of the tree, how files import each other, and the numpy
promotion rules every test runs under.

Layout and imports (the convention for every test file):
- The tree mirrors the package: `tests/ops/core/`, `tests/ops/ttt/`, `tests/ops/lact/`,
  `tests/ops/inplace/`, `tests/ops/npt/`, `tests/layers/`, `tests/models/`, `tests/memory/`,
  `tests/train/`, `tests/data/`, `tests/convert/`; tests of a top-level module of `ttt_jax`
  (`__init__`, `cli`) sit in `tests/` itself.
- Every folder is a package (an empty `__init__.py`) and pytest imports test files with
  `--import-mode=importlib` under their dotted path (`tests.ops.ttt.test_ttt_ops`), so two files
  may share a basename. Only the repository root is on sys.path (`pythonpath = ["."]` in
  pyproject.toml).
- Shared helpers live in `tests/` (helpers of one folder's files in that folder, e.g.
  `tests/ops/lact/lact_helpers.py`; never named `test_*`) and are imported by their full name:
  `from tests.memory_helpers import run_fast`, `from tests._train_helpers import ROOT`. Never
  import one test file from another: shared inputs and constants go into a helper module (or
  `ttt_jax.testing`, e.g. `rel_err`).
- A script run in a subprocess (`tests/_sharded_check.py`) runs as a module from the repository
  root (`python -m tests._sharded_check`, cwd `_train_helpers.ROOT`): run by its path, its folder
  would lead sys.path and `import train` would find `tests/train/`.

Promotion (the autouse fixture `_promotion` below):
- `jax_numpy_dtype_promotion="strict"` for every test, so an implicit bf16 -> fp32 (or int ->
  float, bool -> float) promotion in the library is an error rather than a silent upcast. Not
  in `tests/train/`, `tests/memory/` and `tests/models/test_retrofit.py`: they run optax updates
  in-process, and optax promotes internally (`optax/_src/transform.py`, the Adam bias correction
  `1 - decay**count` mixes a Python float with the int32 step count). Not in the tests of
  `KNOWN_PROMOTIONS`: implicit promotions not fixed yet, of the library or of test code
  written before this rule (each with the place that promotes); delete an entry when its place
  is fixed.
- `jax_numpy_rank_promotion="raise"` in `RANK_STRICT` only (In-Place TTT and NPT ops, written
  without implicit rank broadcasting). Elsewhere the library broadcasts `[D]` scales and taps
  against `[B, T, D]` by design (`ops/core/numerics.py` rms_norm, `ops/causal_conv.py`,
  `ops/rope.py`, the packed TTT slots of `ops/ttt/packed.py`, the LaCT backward), so "raise"
  there would flag idiom, not bugs.
- parity_tests/ keep the standard rules: they feed JAX from numpy/torch arrays of mixed types.
"""

from __future__ import annotations

import contextlib

import jax
import pytest

STANDARD_DTYPE = ("tests/train/", "tests/memory/", "tests/models/test_retrofit.py")
KNOWN_PROMOTIONS = {
    # ttt_jax/layers/attention.py: jax.nn.dot_product_attention gets bf16 q, k, v with fp32
    # operands (and int32 with int64 positions under x64).
    "tests/layers/test_lact_layer.py::test_bf16_compute_keeps_fp32_params_and_state": "attention",
    "tests/layers/test_lact_layer.py::test_pieces_equal_one_call": "attention, x64 positions",
    "tests/models/test_model.py::test_forward_under_bf16_policy": "attention",
    # ttt_jax/ops/lact/math.py: the momentum update adds a bf16 gradient to an fp32 buffer.
    "tests/ops/lact/test_lact_op.py::test_state_dtype_argument": "lact momentum",
    # ttt_jax/ops/lact/packed.py:121 (via ops/lact/vjp.py): int32 with int64 indices under x64.
    "tests/ops/lact/test_lact_segments.py::test_packed_row_equals_documents_alone_float64": "x64",
    "tests/ops/lact/test_lact_segments.py::test_one_document_is_the_unsegmented_op": "x64",
    # ttt_jax/layers/attention.py (from layers/lact.py:429): float64 with float32 under x64.
    "tests/layers/test_lact_segments_layer.py::test_packed_row_equals_documents_alone_muon_float64": "x64",
    # Test code written before the strict rule (its owner casts, then deletes the entry):
    # int32 with a Python float in `1.0 / jnp.arange(...)` (fixed in `make_inputs`) and more;
    "tests/ops/ttt/test_mlp_kernel.py": "test inputs",
    # float32 with float64 in the test's loss (line 98).
    "tests/ops/lact/test_lact_backward_dtype.py::test_wide_compute_and_float32_are_plain_autodiff": "test loss",
}
RANK_STRICT = ("tests/ops/inplace/", "tests/ops/npt/")


@pytest.fixture(autouse=True)
def _promotion(request):
    node = request.node.nodeid
    with contextlib.ExitStack() as stack:
        known = any(node.startswith(k) for k in KNOWN_PROMOTIONS)
        if not known and not node.startswith(STANDARD_DTYPE):
            stack.enter_context(jax.numpy_dtype_promotion("strict"))
        if node.startswith(RANK_STRICT):
            stack.enter_context(jax.numpy_rank_promotion("raise"))
        yield
