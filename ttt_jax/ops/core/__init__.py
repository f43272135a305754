"""The machinery every family shares: the checkpointed chunk scan, time chunking, remat
policies, argument checks and the numerics vocabulary. No family imports another family; they
all import from here."""

# isort: skip_file
# (The banners group the index by topic; isort would sort the imports across them.)

# --- the chunked scan and its memory knobs
from ttt_jax.ops.core.scan import check_scan_knobs, chunked_scan
from ttt_jax.ops.core.chunking import merge_time, split_time
from ttt_jax.ops.core.remat import POLICY_NAMES, resolve_policy

# --- numerics: accumulation dtype, matmul, norms, GELU
from ttt_jax.ops.core.numerics import (
    gelu_tanh,
    gelu_tanh_grad,
    layer_norm,
    matmul,
    rms_norm,
    wide_dtype,
)

# --- packed documents (`segment_ids`): where each token goes when chunks restart per document
from ttt_jax.ops.core.segments import (
    DocSpans,
    SlotLayout,
    doc_spans,
    gather_time,
    scatter_time,
    slot_layout,
)

# --- argument checks (ValueErrors that name the argument, before tracing)
from ttt_jax.ops.core.checks import (
    BACKWARDS,
    check_cache,
    check_choice,
    check_finite_number,
    check_float,
    check_float_dtype,
    check_layer_input,
    check_nonempty,
    check_optional_positive_int,
    check_policy_names,
    check_positive_int,
    check_shapes,
    check_state_type,
)

__all__ = [
    # the chunked scan and its memory knobs
    "POLICY_NAMES",
    "check_scan_knobs",
    "chunked_scan",
    "merge_time",
    "resolve_policy",
    "split_time",
    # numerics
    "gelu_tanh",
    "gelu_tanh_grad",
    "layer_norm",
    "matmul",
    "rms_norm",
    "wide_dtype",
    # packed documents
    "DocSpans",
    "SlotLayout",
    "doc_spans",
    "gather_time",
    "scatter_time",
    "slot_layout",
    # argument checks
    "BACKWARDS",
    "check_cache",
    "check_choice",
    "check_finite_number",
    "check_float",
    "check_float_dtype",
    "check_layer_input",
    "check_nonempty",
    "check_optional_positive_int",
    "check_policy_names",
    "check_positive_int",
    "check_shapes",
    "check_state_type",
]
