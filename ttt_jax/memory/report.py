"""Memory report of a layer or a model: forward peak, backward (fwd+bwd) peak and, for models,
the training step's peak, with argument / output / temp bytes from the compiler and (on a GPU)
the allocator's peak and steady bytes. `python -m ttt_jax.memory report --help` is the
command-line face."""

from __future__ import annotations

import dataclasses
import json

import jax

from ttt_jax.memory.analysis import CompiledMemory, MeasuredMemory, measured_memory
from ttt_jax.memory.layer_spec import LayerSpec
from ttt_jax.memory.workload import Workload

PROGRAM_TITLES = {"forward": "forward", "fwd_bwd": "fwd+bwd", "train_step": "train step"}


@dataclasses.dataclass(frozen=True)
class Report:
    """Compiled (and optionally measured) memory of a workload's programs.

    Attributes:
      title: the config in one line.
      batch, seq: the input shape.
      state_bytes: parameters (+ optimizer state for models).
      compiled: program name (`forward`, `fwd_bwd`, `train_step`) -> compiler's numbers.
      measured: program name -> allocator's numbers (GPU), or empty.
      backend: `jax.default_backend()` and the jax version it was made with.
    """

    title: str
    batch: int
    seq: int
    state_bytes: int
    compiled: dict[str, CompiledMemory]
    measured: dict[str, MeasuredMemory] = dataclasses.field(default_factory=dict)
    backend: str = dataclasses.field(
        default_factory=lambda: f"{jax.default_backend()}, jax {jax.__version__}"
    )

    @property
    def forward(self) -> CompiledMemory:
        return self.compiled["forward"]

    @property
    def fwd_bwd(self) -> CompiledMemory:
        return self.compiled["fwd_bwd"]

    @property
    def forward_peak(self) -> int:
        return self.forward.peak

    @property
    def backward_peak(self) -> int:
        """Peak of the program that runs the backward: the training step for a model, else
        the forward+backward."""
        return self.compiled.get("train_step", self.fwd_bwd).peak

    def to_dict(self) -> dict:
        return dict(
            title=self.title,
            batch=self.batch,
            seq=self.seq,
            backend=self.backend,
            state_bytes=self.state_bytes,
            forward_peak=self.forward_peak,
            backward_peak=self.backward_peak,
            compiled={k: v.to_dict() for k, v in self.compiled.items()},
            measured={k: v.to_dict() for k, v in self.measured.items()},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        names = list(self.compiled)
        rows = [("", *(PROGRAM_TITLES.get(n, n) for n in names))]
        for field in ("argument", "output", "temp", "alias", "peak"):
            rows.append(
                (f"{field} (compiled)", *(gib(getattr(self.compiled[n], field)) for n in names))
            )
        if any(self.compiled[n].host_temp for n in names):
            host = (gib(self.compiled[n].host_temp) for n in names)
            rows.append(("host temp (offloaded)", *host))
        if self.measured:
            m = [self.measured.get(n) for n in names]
            rows += [
                ("peak_bytes_in_use before", *(gib(x.pre_peak) if x else "-" for x in m)),
                ("peak_bytes_in_use", *(gib(x.peak) if x else "-" for x in m)),
                ("steady bytes_in_use", *(gib(x.steady) if x else "-" for x in m)),
                ("efficiency steady/peak", *(f"{x.efficiency:.2f}" if x else "-" for x in m)),
            ]
        width = max(len(r[0]) for r in rows)
        head = (
            f"{self.title}  B={self.batch} T={self.seq}  state {gib(self.state_bytes)}  "
            f"[{self.backend}]"
        )
        lines = [head] + [f"{r[0]:<{width}}" + "".join(f"  {c:>12}" for c in r[1:]) for r in rows]
        return "\n".join(lines)


def gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def workload_report(workload: Workload, batch: int, seq: int, measure: bool = False) -> Report:
    """Compiles each of the workload's programs on abstract shapes and reports their memory;
    with `measure=True` on a GPU also runs them (forward first: the allocator's peak counter
    only grows) and reads the allocator."""
    programs = workload.programs(batch, seq)
    compiled = {name: p.compiled() for name, p in programs.items()}
    measured = {}
    if measure:
        for name, program in programs.items():
            memory, out = measured_memory(
                program.fn, *program.real_args(), donate_argnums=program.donate_argnums
            )
            del out
            if memory is not None:
                measured[name] = memory
    return Report(
        title=workload.describe(),
        batch=batch,
        seq=seq,
        state_bytes=workload.state_bytes(),
        compiled=compiled,
        measured=measured,
    )


def layer_report(spec: LayerSpec, measure: bool = False) -> Report:
    """The report of the layer `spec` names, at its batch and sequence length."""
    return workload_report(spec.workload(), spec.batch, spec.seq, measure=measure)
