"""Compile-time memory of a function on abstract shapes, and measured memory on a GPU."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """What XLA's buffer assignment reports for one compiled program (bytes).

    `peak` is the program's own high-water mark on the device as the compiler plans it:
    arguments and outputs live together with the largest set of temporaries at once (outputs
    aliased to donated arguments counted once). `host_temp` is what an `offload_names:` remat
    policy moved to host memory (0 on backends that do not offload, the CPU among them).
    """

    argument: int
    output: int
    temp: int
    alias: int
    generated_code: int
    host_temp: int = 0

    @property
    def peak(self) -> int:
        return self.argument + self.output + self.temp - self.alias

    def to_dict(self) -> dict[str, int]:
        return dict(dataclasses.asdict(self), peak=self.peak)

    @classmethod
    def of(cls, compiled: Any) -> CompiledMemory:
        """The numbers of a compiled executable's `memory_analysis()`."""
        stats = compiled.memory_analysis()
        return cls(
            argument=int(stats.argument_size_in_bytes),
            output=int(stats.output_size_in_bytes),
            temp=int(stats.temp_size_in_bytes),
            alias=int(stats.alias_size_in_bytes),
            generated_code=int(stats.generated_code_size_in_bytes),
            host_temp=int(getattr(stats, "host_temp_size_in_bytes", 0) or 0),
        )


# CPU compile options that leave the memory numbers as they are and make a compile 3-5x faster
# (most of what the planner spends): buffer assignment runs on the optimised HLO, before the
# LLVM passes (level 0 skips their optimisations), and the legacy elemental fusion emitters
# are much cheaper to run than the MLIR ones while taking the same fusion decisions. Measured
# on jax 0.10.2: identical arguments, outputs and aliases, temp within 192 bytes (alignment
# of one small buffer) on layers and models (tests/memory/test_memory_report.py asserts it). Other
# backends compile exactly as for a real run.
FAST_CPU_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
    "xla_llvm_disable_expensive_passes": True,
}
_unknown_options: set[str] = set()


def compile_lowered(lowered, fast: bool = True):
    """`lowered.compile()`, with `FAST_CPU_OPTIONS` on the CPU when `fast` (the program runs
    as well, only slower: a benchmark's CPU smoke run uses it)."""
    if not fast or jax.default_backend() != "cpu":
        return lowered.compile()
    options = {k: v for k, v in FAST_CPU_OPTIONS.items() if k not in _unknown_options}
    try:
        return lowered.compile(compiler_options=options)
    except Exception as err:  # a jaxlib without one of the flags: drop it, stay correct
        unknown = [k for k in options if k in str(err)]
        if "No such compile option" not in str(err) or not unknown:
            raise
        _unknown_options.update(unknown)
        return compile_lowered(lowered, fast)


def compiled_memory(
    fn: Callable, *abstract_args: Any, donate_argnums: Sequence[int] = (), fast: bool = True
) -> CompiledMemory:
    """Compiles `jax.jit(fn)` for abstract arguments (`jax.ShapeDtypeStruct` pytrees) and reads
    `compiled.memory_analysis()`. Nothing is allocated; works on any backend.

    Args:
      fn: the function, as it would be jitted.
      *abstract_args: its arguments (abstract or real: only shapes and dtypes matter).
      donate_argnums: as in `jax.jit`: a training step donates its parameters and optimizer
        state, so the new ones reuse their buffers (counted in `alias`).
      fast: on the CPU, compile with `FAST_CPU_OPTIONS`.
    """
    lowered = jax.jit(fn, donate_argnums=tuple(donate_argnums)).lower(*abstract_args)
    return CompiledMemory.of(compile_lowered(lowered, fast))


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of a pytree (arrays or `jax.ShapeDtypeStruct`s)."""
    return sum(
        int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


@dataclasses.dataclass(frozen=True)
class MeasuredMemory:
    """Device allocator statistics around one real run (bytes; GPU/TPU only).

    `peak` is `peak_bytes_in_use` after the run; `steady` is `bytes_in_use` after it, what
    stays allocated once the step is done (inputs, parameters, optimizer state, outputs);
    `efficiency = steady / peak`, the users' measure of how much of the peak is transient.
    `pre_peak` is `peak_bytes_in_use` just before the run: the counter has also seen the
    compile (the GPU autotuner's buffers) and whatever the process did before, so `peak` is
    the run's own only where the run raised it (`run_sets_peak`); else the run's is at most
    `peak`. `pre_steady` is `bytes_in_use` just before the run (its arguments and whatever
    else the process holds); `bytes_limit` the allocator's limit (0 if it reports none).
    """

    peak: int
    steady: int
    pre_peak: int = 0
    pre_steady: int = 0
    bytes_limit: int = 0

    @property
    def efficiency(self) -> float:
        return self.steady / self.peak if self.peak else float("nan")

    @property
    def run_sets_peak(self) -> bool:
        return self.peak > self.pre_peak

    def to_dict(self) -> dict[str, float]:
        return dict(
            dataclasses.asdict(self), efficiency=self.efficiency, run_sets_peak=self.run_sets_peak
        )


def measured_memory(
    fn: Callable, *args: Any, donate_argnums: Sequence[int] = ()
) -> tuple[MeasuredMemory | None, Any]:
    """Runs `jax.jit(fn)(*args)` once compiled and reads the device allocator's statistics.

    Returns `(memory, outputs)`; memory is None where the backend keeps no statistics (the
    CPU). The caller owns the outputs (they are part of `steady`; delete them before measuring
    the next program). The peak counter cannot be reset through JAX: it is the process's peak
    so far, so measure programs in increasing order of peak, or one per fresh process.
    """
    compiled = jax.jit(fn, donate_argnums=tuple(donate_argnums)).lower(*args).compile()
    return run_measured(compiled, *args)


def run_measured(compiled: Any, *args: Any) -> tuple[MeasuredMemory | None, Any]:
    """`measured_memory` of an already compiled executable (`jax.stages.Compiled`)."""
    device = jax.devices()[0]
    before = device.memory_stats()
    out = jax.block_until_ready(compiled(*args))
    stats = device.memory_stats()
    if stats is None or before is None:
        return None, out
    memory = MeasuredMemory(
        peak=int(stats["peak_bytes_in_use"]),
        steady=int(stats["bytes_in_use"]),
        pre_peak=int(before["peak_bytes_in_use"]),
        pre_steady=int(before["bytes_in_use"]),
        bytes_limit=int(stats.get("bytes_limit", 0)),
    )
    return memory, out
