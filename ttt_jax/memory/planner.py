"""The memory planner: the remat settings and the longest sequence (or largest batch) that fit a
device memory budget, found by compiling candidates on abstract shapes, never by formula.

    plan = ttt_jax.memory.plan(ttt_jax.models.preset("125m"), 24 * 2**30, batch=8)
    plan.seq, plan.remat, plan.config      # train with plan.config at plan.seq

What fits is judged by the compiler's planned peak of the training program (`train_step` for a
model: parameters, optimizer state, gradients and activations; `fwd_bwd` for a layer) on the
backend JAX runs on, so plan on the machine you will train on (or its backend).

Search. The candidates (`Workload.remat_candidates`) are ordered from preferred (fastest) to
most memory saved. The last is searched first, for the longest sequence it fits
(`ttt_jax.memory.search`: a bracketing search on compiled peaks whose pivots interpolate the
peaks already compiled, so a few compiles land on the boundary). Then the preferred candidates
are tried in order, each first at the length it would need to be worth choosing (within
`tolerance` of the longest); the first that fits there is searched to its own longest and
chosen. Compiles are cached per process.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from ttt_jax.memory.analysis import CompiledMemory
from ttt_jax.memory.layer_workload import LAYER_FAMILIES, LayerWorkload
from ttt_jax.memory.model_workload import ModelWorkload
from ttt_jax.memory.search import largest_fit
from ttt_jax.memory.workload import Remat, Workload
from ttt_jax.models import ModelConfig

SEQ_MULTIPLE = 256
CACHE_SIZE = 512
_CACHE: collections.OrderedDict[tuple, CompiledMemory] = collections.OrderedDict()


def as_workload(config: Any, **kwargs) -> Workload:
    """A workload for a `ModelConfig`, any registered layer config, or a workload as is."""
    if isinstance(config, Workload):
        return config
    if type(config) in LAYER_FAMILIES:
        return LayerWorkload(config, **kwargs)
    if isinstance(config, ModelConfig):
        return ModelWorkload(config, **kwargs)
    known = ", ".join(["ModelConfig", *(t.__name__ for t in LAYER_FAMILIES)])
    raise ValueError(f"cannot plan for a {type(config).__name__}; give one of: {known}")


def compiled_peak(workload: Workload, batch: int, seq: int) -> CompiledMemory:
    """The compiler's memory of the workload's fit program at `(batch, seq)`, cached."""
    key = (workload, workload.fit_program, batch, seq)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    memory = workload.programs(batch, seq)[workload.fit_program].compiled()
    _CACHE[key] = memory
    if len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return memory


@dataclasses.dataclass(frozen=True)
class Trial:
    """One compiled candidate: its settings, shape, planned peak and whether it fit."""

    remat: Remat
    batch: int
    seq: int
    peak: int
    fits: bool


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the planner chose.

    Attributes:
      workload: the config with the chosen remat settings applied (`config` is its config).
      remat: the chosen settings.
      batch, seq: the shape that fits (the one searched is the longest / largest).
      peak: the compiler's planned peak of the fit program at that shape (bytes).
      budget: the budget it fits (bytes).
      state_bytes: parameters (+ optimizer state) within the peak.
      trials: every candidate compiled, in order.
      searched: "seq" or "batch".
    """

    workload: Workload
    remat: Remat
    batch: int
    seq: int
    peak: int
    budget: int
    state_bytes: int
    trials: tuple[Trial, ...]
    searched: str

    @property
    def config(self) -> Any:
        return self.workload.config

    def to_dict(self) -> dict:
        return dict(
            remat=dataclasses.asdict(self.remat),
            batch=self.batch,
            seq=self.seq,
            peak=self.peak,
            budget=self.budget,
            state_bytes=self.state_bytes,
            searched=self.searched,
            compiles=len(self.trials),
            trials=[dict(dataclasses.asdict(t), remat=t.remat.label()) for t in self.trials],
        )

    def summary(self) -> str:
        state = "parameters+optimizer" if self.workload.fit_program == "train_step" else "params"
        return (
            f"{self.workload.describe()}\n"
            f"fits: batch={self.batch} seq={self.seq} ({self.searched} searched), "
            f"peak {fmt_bytes(self.peak)} of budget {fmt_bytes(self.budget)} "
            f"({state} {fmt_bytes(self.state_bytes)}), "
            f"{len(self.trials)} compiles"
        )


class PlanError(ValueError):
    """Nothing fits; `closest` is the trial with the smallest peak at the smallest shape."""

    def __init__(self, message: str, closest: Trial | None = None):
        super().__init__(message)
        self.closest = closest


def plan(
    config: Any,
    budget_bytes: int,
    *,
    batch: int = 1,
    seq: int | None = None,
    candidates: Sequence[Remat] | None = None,
    seq_multiple: int | None = None,
    max_seq: int = 2**20,
    max_batch: int = 4096,
    tolerance: float = 0.05,
    **workload_kwargs,
) -> Plan:
    """Chooses remat settings and the longest sequence (or, with `seq` given, the largest
    batch) whose training program fits `budget_bytes`.

    Args:
      config: a `ttt_jax.models.ModelConfig`, a layer config (`TTTConfig`, `LaCTConfig`,
        `InPlaceMLPConfig`, `NPTMLPConfig`, ...; `ttt_jax.memory.layer_workload`) or a
        `Workload`.
      budget_bytes: device memory the program may use (bytes).
      batch: batch size when searching the sequence length.
      seq: fix the sequence length and search the batch size instead.
      candidates: remat settings to choose among (default: the workload's, least
        recomputation first, most memory saved last).
      seq_multiple: searched lengths are multiples of this (default: 256 and the workload's
        chunk size).
      max_seq, max_batch: the search's upper ends.
      tolerance: a setting that recomputes less is preferred while it fits within this
        fraction of the longest length (largest batch) found.
      **workload_kwargs: passed to the workload (`precision=` for `InPlaceMLPConfig`,
        `loss=` / `optimizer=` for a model).

    Returns:
      The `Plan`.

    Raises:
      ValueError: a budget below the parameter (+ optimizer) bytes, with both numbers; bad
        arguments.
      PlanError: nothing fits even at the smallest shape; says which setting came closest.
    """
    workload = as_workload(config, **workload_kwargs)
    if not budget_bytes > 0:
        raise ValueError(f"budget_bytes={budget_bytes} must be > 0")
    if batch < 1 or (seq is not None and seq < 1):
        raise ValueError(f"batch={batch} and seq={seq} must be >= 1")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance={tolerance} must be in [0, 1)")
    state = workload.state_bytes()
    if budget_bytes < state:
        what = "parameters + optimizer state" if workload.fit_program == "train_step" else "params"
        raise ValueError(
            f"budget {fmt_bytes(budget_bytes)} ({budget_bytes} bytes) is below the {what} "
            f"alone, {fmt_bytes(state)} ({state} bytes): nothing else would fit"
        )
    candidates = list(candidates or workload.remat_candidates())
    if not candidates:
        raise ValueError("no remat candidates to try")
    if seq is None:
        mult = math.lcm(seq_multiple or SEQ_MULTIPLE, workload.seq_multiple)
        kmax = max_seq // mult
        if kmax < 1:
            raise ValueError(f"max_seq={max_seq} is below the sequence multiple {mult}")

        def shape(k):
            return batch, k * mult
    else:
        mult, kmax = 1, max_batch

        def shape(k):
            return k, seq

    trials: list[Trial] = []

    def probe(remat: Remat) -> Callable[[int], int]:
        w = workload.with_remat(remat)

        def peak(k: int) -> int:
            b, t = shape(k)
            p = compiled_peak(w, b, t).peak
            trials.append(Trial(remat, b, t, p, p <= budget_bytes))
            return p

        return peak

    # The most memory-saving candidate bounds what any can reach.
    last = candidates[-1]
    start = max(1, min(kmax, 4096 // mult)) if seq is None else 1
    k_best, points = largest_fit(probe(last), budget_bytes, kmax, start)
    chosen = last
    if k_best == 0:
        # Something cheaper may still fit (remat is not always monotone); else report.
        for remat in candidates[:-1]:
            if probe(remat)(1) <= budget_bytes:
                chosen = remat
                k_best, points = largest_fit(
                    probe(remat), budget_bytes, kmax, 2, {1: trials[-1].peak}
                )
                break
        else:
            closest = min(
                (t for t in trials if t.seq == shape(1)[1] and t.batch == shape(1)[0]),
                key=lambda t: t.peak,
            )
            raise PlanError(
                f"nothing fits in {fmt_bytes(budget_bytes)}: the closest setting was "
                f"{closest.remat.label()} at batch={closest.batch} seq={closest.seq}, peak "
                f"{fmt_bytes(closest.peak)} ({fmt_bytes(closest.peak - budget_bytes)} over)",
                closest,
            )
    else:
        need = max(1, math.ceil(k_best * (1 - tolerance)))
        for remat in candidates[:-1]:
            peak = probe(remat)
            p_need = peak(need)
            if p_need <= budget_bytes:
                # Searched up to the most memory-saving candidate's longest, not beyond.
                chosen = remat
                k_best, points = largest_fit(peak, budget_bytes, k_best, need + 1, {need: p_need})
                break
    b, t = shape(k_best)
    return Plan(
        workload=workload.with_remat(chosen),
        remat=chosen,
        batch=b,
        seq=t,
        peak=points[k_best],
        budget=int(budget_bytes),
        state_bytes=state,
        trials=tuple(trials),
        searched="seq" if seq is None else "batch",
    )


_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({f"{u}ib": 2 ** (10 * i) for i, u in enumerate("kmgt", start=1)})
_UNITS.update({f"{u}b": 10 ** (3 * i) for i, u in enumerate("kmgt", start=1)})


def parse_bytes(text: str | int) -> int:
    """`"24GiB"`, `"512MiB"`, `"80GB"`, `"1.5e9"` or an int -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise ValueError(f"budget {text!r} is not a size like 24GiB, 512MiB, 80GB or 1e9")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"
