"""Compile-time memory of a function on abstract shapes, and measured memory on a GPU."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """What XLA's buffer assignment reports for one compiled program (bytes).

    `peak` is the program's own high-water mark as the compiler plans it: arguments and outputs
    live together with the largest set of temporaries at once (aliased outputs counted once).
    """

    argument: int
    output: int
    temp: int
    alias: int
    generated_code: int

    @property
    def peak(self) -> int:
        return self.argument + self.output + self.temp - self.alias


def compiled_memory(fn: Callable, *abstract_args: Any) -> CompiledMemory:
    """Compiles `jax.jit(fn)` for abstract arguments (`jax.ShapeDtypeStruct` pytrees) and reads
    `compiled.memory_analysis()`. Nothing is allocated; works on any backend."""
    stats = jax.jit(fn).lower(*abstract_args).compile().memory_analysis()
    return CompiledMemory(
        argument=int(stats.argument_size_in_bytes),
        output=int(stats.output_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
        alias=int(stats.alias_size_in_bytes),
        generated_code=int(stats.generated_code_size_in_bytes),
    )


@dataclasses.dataclass(frozen=True)
class MeasuredMemory:
    """Device allocator statistics around one real run (bytes; GPU/TPU only).

    `steady` is what stays allocated after the step (inputs, parameters, outputs, gradients);
    `efficiency = steady / peak`, the users' measure of how much of the peak is transient.
    """

    peak: int
    steady: int

    @property
    def efficiency(self) -> float:
        return self.steady / self.peak if self.peak else float("nan")


def measured_memory(fn: Callable, *args: Any) -> MeasuredMemory | None:
    """Runs `jax.jit(fn)(*args)` once compiled and reads the device allocator's statistics.

    Returns None where the backend keeps no statistics (the CPU). The peak counter cannot be
    reset through JAX, so call this in a fresh process per configuration for a clean peak.
    """
    device = jax.devices()[0]
    if device.memory_stats() is None:
        return None
    compiled = jax.jit(fn).lower(*args).compile()
    out = compiled(*args)
    jax.block_until_ready(out)
    stats = device.memory_stats()
    return MeasuredMemory(peak=int(stats["peak_bytes_in_use"]), steady=int(stats["bytes_in_use"]))
