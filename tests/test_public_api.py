"""The public index (issue 15): `import ttt_jax` reaches every subpackage a user needs, each
package index exports exactly the names pinned here (a change to the public surface is a change
to this file), layers and everything above them import ops only through an index, and no op
family imports another. Reads source files and imports modules; compiles nothing."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import ttt_jax

ROOT = pathlib.Path(ttt_jax.__file__).parent
OPS = ROOT / "ops"

PUBLIC = {
    "ttt_jax": ["ops", "layers", "models", "memory", "data", "convert", "testing"],
    "ttt_jax.ops": [
        "POLICY_NAMES", "chunked_scan", "resolve_policy",
        "TTTLinearState", "TTTMLPState", "ttt_linear", "ttt_linear_primal", "ttt_mlp",
        "ttt_mlp_primal",
        "LaCTState", "lact_low_rank_weight", "lact_swiglu",
        "InPlaceState", "inplace_ttt",
        "npt_generated_rank_k_linear", "npt_modulated_linear", "npt_rank_k_linear",
    ],
    "ttt_jax.ops.core": [
        "POLICY_NAMES", "check_scan_knobs", "chunked_scan", "merge_time", "resolve_policy",
        "split_time",
        "gelu_tanh", "gelu_tanh_grad", "layer_norm", "matmul", "rms_norm", "wide_dtype",
        "DocSpans", "SlotLayout", "doc_spans", "gather_time", "scatter_time", "slot_layout",
        "BACKWARDS", "check_cache", "check_choice", "check_finite_number", "check_float",
        "check_float_dtype", "check_layer_input", "check_nonempty",
        "check_optional_positive_int", "check_policy_names", "check_positive_int",
        "check_shapes", "check_state_type",
    ],
    "ttt_jax.ops.ttt": [
        "IMPLS", "NAMES", "TTTLinearState", "TTTMLPState", "resolve_impl", "resolve_mlp_impl",
        "ttt_linear", "ttt_linear_primal", "ttt_mlp", "ttt_mlp_primal",
    ],
    "ttt_jax.ops.lact": ["BACKWARDS", "LaCTState", "NAMES", "lact_low_rank_weight", "lact_swiglu"],
    "ttt_jax.ops.inplace": [
        "BACKWARDS", "CONV_KERNEL_SIZES", "CONV_MODES", "InPlaceState", "NAMES", "PREFIXES",
        "inplace_ttt",
    ],
    "ttt_jax.layers": [
        "BF16", "FP32", "MixedPrecision",
        "Attention", "AttentionCache", "AttentionConfig",
        "TTTCache", "TTTConfig", "TTTLayer", "TTTLinear", "TTTMLP",
        "LaCTCache", "LaCTConfig", "LaCTLayer",
        "SwiGLU", "SwiGLUConfig",
        "InPlaceCache", "InPlaceMLP", "InPlaceMLPConfig",
        "NPTMLP", "NPTMLPConfig", "NPTBlock", "NPTBlockConfig",
    ],
    "ttt_jax.models": [
        "ModelConfig", "AttentionOptions", "InPlaceOptions", "LaCTOptions", "NPTOptions",
        "Shared", "TTTOptions",
        "PRESETS", "preset",
        "FAMILIES", "MIXERS", "MLPS", "Family",
        "LM", "LMCache", "segment_positions", "generate",
        "flops_per_token", "param_counts",
    ],
    "ttt_jax.memory": [
        "Program", "Remat", "Workload", "LAYERS", "LayerSpec", "LayerFamily", "LayerWorkload",
        "register_layer", "ModelWorkload",
        "CompiledMemory", "MeasuredMemory", "compiled_memory", "measured_memory",
        "Report", "layer_report", "workload_report",
        "Plan", "PlanError", "as_workload", "parse_bytes", "plan",
    ],
    "ttt_jax.convert": [
        "MODEL_TYPES", "config_from_hf", "config_to_hf", "abstract_params", "export_pretrained",
        "load_pretrained",
    ],
    "ttt_jax.data": [
        "SOURCES", "DataConfig", "Dataset", "make_dataset", "MQAR", "TokenStream", "Batches",
    ],
}  # fmt: skip


def test_the_top_level_index_reaches_every_subpackage():
    assert ttt_jax.layers.TTTLinear.__name__ == "TTTLinear"
    assert ttt_jax.ops.ttt_linear is ttt_jax.ops.ttt.ttt_linear
    assert ttt_jax.models.preset("tiny").d_model == 128
    assert ttt_jax.memory.plan is not None and ttt_jax.data.Batches is not None
    assert ttt_jax.testing.rel_err([1.0], [1.0]) == 0.0


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_each_index_exports_exactly_the_pinned_names(name):
    module = importlib.import_module(name)
    assert sorted(module.__all__) == sorted(PUBLIC[name]), name
    assert len(set(module.__all__)) == len(module.__all__), f"{name}: a name listed twice"
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.{attr} is listed but not defined"


def _imported(path: pathlib.Path) -> list[tuple[int, str]]:
    """`(line, module)` of every absolute import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
    return out


def _family_indexes() -> set[str]:
    """`ttt_jax.ops` and its direct children: the core and family packages, and one-file
    families (their module is their index)."""
    children = {p.name for p in OPS.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    children |= {p.stem for p in OPS.glob("*.py") if p.stem != "__init__"}
    return {"ttt_jax.ops", *(f"ttt_jax.ops.{c}" for c in children)}


def test_layers_and_above_import_ops_only_through_an_index():
    allowed = _family_indexes()
    bad = []
    for folder in ("layers", "models", "memory", "data"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, module in _imported(path):
                if module.startswith("ttt_jax.ops") and module not in allowed:
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {module}")
    assert not bad, "import the op's family index instead:\n" + "\n".join(bad)


def test_no_op_family_imports_another():
    bad = []
    for path in sorted(OPS.rglob("*.py")):
        parts = path.relative_to(OPS).with_suffix("").parts
        family = parts[0]
        if family in ("__init__", "core"):
            continue
        for line, module in _imported(path):
            if not module.startswith("ttt_jax.ops"):
                continue
            target = module.split(".")[2] if module.count(".") >= 2 else None
            if target not in ("core", family):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {module}")
    assert not bad, "a family imports only ttt_jax.ops.core and itself:\n" + "\n".join(bad)
