"""Memory tools: compile-time analysis on abstract shapes, GPU measurements, layer reports."""

from ttt_jax.memory.analysis import CompiledMemory, MeasuredMemory, compiled_memory, measured_memory
from ttt_jax.memory.report import LayerSpec, Report, layer_report

__all__ = [
    "CompiledMemory",
    "LayerSpec",
    "MeasuredMemory",
    "Report",
    "compiled_memory",
    "layer_report",
    "measured_memory",
]
