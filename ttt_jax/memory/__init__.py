"""Memory tools: compile-time analysis on abstract shapes, GPU measurements, reports of layers
and models, and the planner that fits remat settings and sequence length into a budget."""

# --- compiling and measuring
from ttt_jax.memory.analysis import CompiledMemory, MeasuredMemory, compiled_memory, measured_memory

# --- what gets compiled: a layer or a model with its remat settings
from ttt_jax.memory.layer_spec import LAYERS, LayerSpec
from ttt_jax.memory.layer_workload import LayerFamily, LayerWorkload, register_layer
from ttt_jax.memory.model_workload import ModelWorkload

# --- the planner
from ttt_jax.memory.planner import Plan, PlanError, as_workload, parse_bytes, plan

# --- reports
from ttt_jax.memory.report import Report, layer_report, workload_report
from ttt_jax.memory.workload import Program, Remat, Workload

__all__ = [
    "LAYERS",
    "CompiledMemory",
    "LayerFamily",
    "LayerSpec",
    "LayerWorkload",
    "MeasuredMemory",
    "ModelWorkload",
    "Plan",
    "PlanError",
    "Program",
    "Remat",
    "Report",
    "Workload",
    "as_workload",
    "compiled_memory",
    "layer_report",
    "measured_memory",
    "parse_bytes",
    "plan",
    "register_layer",
    "workload_report",
]
