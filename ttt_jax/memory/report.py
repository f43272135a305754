"""Memory report of a layer or a model: forward peak, backward (fwd+bwd) peak and, for models,
the training step's peak, with argument / output / temp bytes from the compiler and (on a GPU)
the allocator's peak and steady bytes. `python -m ttt_jax.memory report --help` is the
command-line face."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import jax

from ttt_jax.layers import InPlaceMLPConfig, MixedPrecision, NPTMLPConfig, TTTConfig
from ttt_jax.memory.analysis import CompiledMemory, MeasuredMemory, measured_memory
from ttt_jax.memory.layer_workload import LayerWorkload
from ttt_jax.memory.workload import Workload

LAYERS = ("ttt_linear", "ttt_mlp", "inplace", "npt")
PROGRAM_TITLES = {"forward": "forward", "fwd_bwd": "fwd+bwd", "train_step": "train step"}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A layer at a given shape, as the command line describes it.

    Attributes:
      layer: one of `LAYERS`: `ttt_linear` / `ttt_mlp` (`TTTLayer`), `inplace`
        (`InPlaceMLP`, targets from its input), `npt` (`NPTMLP`, low-rank, modulated by its
        input).
      seq: sequence length T.
      batch: batch size B.
      d_model: model width (the 125M shape is 768 with 12 heads).
      heads: number of heads (TTT layers).
      mini_batch: TTT mini-batch size C (ttt_linear, ttt_mlp).
      chunk: tokens per fast-weight update of `inplace` (None: 1024).
      d_ff: MLP hidden width of `inplace` / `npt` (None: 4 * d_model).
      checkpoint_group: inner-scan remat group (None: no remat; "default": the layer config's
        own default, 4 for TTT layers, none for the others).
      remat_policy: policy name inside a group.
      precision: "fp32" or "bf16" (fp32 params and state, bf16 compute).
    """

    layer: Literal["ttt_linear", "ttt_mlp", "inplace", "npt"] = "ttt_linear"
    seq: int = 2048
    batch: int = 1
    d_model: int = 768
    heads: int = 12
    mini_batch: int = 16
    chunk: int | None = None
    d_ff: int | None = None
    checkpoint_group: int | None | Literal["default"] = "default"
    remat_policy: str | None = None
    precision: Literal["fp32", "bf16"] = "bf16"

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"layer={self.layer!r} is not one of {', '.join(LAYERS)}")
        for name in ("seq", "batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")

    def workload(self) -> LayerWorkload:
        """The layer config this spec names, as a workload (raises the config's own errors)."""
        precision = MixedPrecision.named(self.precision)
        d_ff = self.d_ff or 4 * self.d_model
        knobs = dict(remat_policy=self.remat_policy)
        if self.checkpoint_group != "default":
            knobs.update(checkpoint_group=self.checkpoint_group)
        group = knobs.get("checkpoint_group")
        if self.layer in ("ttt_linear", "ttt_mlp"):
            config = TTTConfig(
                d_model=self.d_model,
                num_heads=self.heads,
                inner="linear" if self.layer == "ttt_linear" else "mlp",
                mini_batch_size=self.mini_batch,
                precision=precision,
                **knobs,
            )
            return LayerWorkload(config)
        if self.layer == "inplace":
            # The autodiff backward is the one the remat knobs act on (the custom one keeps no
            # per-chunk state); ask for it only when a knob is set.
            backward = "custom" if group is None else "autodiff"
            config = InPlaceMLPConfig(
                d_model=self.d_model,
                d_ff=d_ff,
                chunk_size=self.chunk or 1024,
                target_source="input",
                backward=backward,
                **knobs,
            )
            return LayerWorkload(config, precision=precision)
        if group is not None or self.remat_policy is not None:
            raise ValueError(f"layer={self.layer!r} has no scan: drop checkpoint_group/policy")
        return LayerWorkload(NPTMLPConfig(d_model=self.d_model, d_ff=d_ff, precision=precision))


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
