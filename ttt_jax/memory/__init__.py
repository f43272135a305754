"""Memory tools: compile-time analysis on abstract shapes, GPU measurements, reports of layers
and models, and the planner that fits remat settings and sequence length into a budget."""

# isort: skip_file
# (The banners group the index by topic; isort would sort the imports across them.)

# --- what gets compiled: a layer or a model with its remat settings
from ttt_jax.memory.workload import Program, Remat, Workload
from ttt_jax.memory.layer_spec import LAYERS, LayerSpec
from ttt_jax.memory.layer_workload import LayerFamily, LayerWorkload, register_layer
from ttt_jax.memory.model_workload import ModelWorkload

# --- compiling and measuring
from ttt_jax.memory.analysis import CompiledMemory, MeasuredMemory, compiled_memory, measured_memory

# --- reports
from ttt_jax.memory.report import Report, layer_report, workload_report

# --- the planner
from ttt_jax.memory.planner import Plan, PlanError, as_workload, parse_bytes, plan

__all__ = [
    # what gets compiled
    "Program",
    "Remat",
    "Workload",
    "LAYERS",
    "LayerSpec",
    "LayerFamily",
    "LayerWorkload",
    "register_layer",
    "ModelWorkload",
    # compiling and measuring
    "CompiledMemory",
    "MeasuredMemory",
    "compiled_memory",
    "measured_memory",
    # reports
    "Report",
    "layer_report",
    "workload_report",
    # the planner
    "Plan",
    "PlanError",
    "as_workload",
    "parse_bytes",
    "plan",
]
