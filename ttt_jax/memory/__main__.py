"""`python -m ttt_jax.memory report|plan ...`: the memory report and planner on the command line.

Examples (CPU, abstract shapes, nothing allocated; add --measure to a report on a GPU):

    python -m ttt_jax.memory report --layer ttt_linear --seq 8192 --batch 1 --checkpoint-group 4
    python -m ttt_jax.memory report --model 125m --seq 8192 --json
    python -m ttt_jax.memory report --model 125m --baseline --seq 8192
    python -m ttt_jax.memory plan --layer ttt_linear --budget 24GiB
    python -m ttt_jax.memory plan --model tiny --budget 8GiB --search batch --seq 4096

A report compiles the forward, the forward+backward (its peak is the backward peak) and, for a
model, the training step. A plan searches the longest sequence at `--batch` (or with
`--search batch` the largest batch at `--seq`) and the remat settings that fit `--budget`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import jax
import tyro

from ttt_jax.memory.model_workload import ModelWorkload
from ttt_jax.memory.planner import parse_bytes, plan
from ttt_jax.memory.report import LayerSpec, workload_report
from ttt_jax.memory.workload import Workload
from ttt_jax.models import preset


@dataclasses.dataclass(frozen=True)
class Target:
    """A layer (`--layer` and its shape) or a model preset (`--model`)."""

    spec: tyro.conf.OmitArgPrefixes[LayerSpec] = LayerSpec()
    model: str | None = None
    """A preset of ttt_jax.models (tiny, 125m, 350m, 760m); replaces --layer. The layer shape
    flags are ignored; --precision, --checkpoint-group and --remat-policy (the inner scans')
    apply."""
    baseline: bool = False
    """With --model: its attention-only variant (NAME-attn)."""
    block_remat: str | None = None
    """With --model: the block remat policy (none, full, dots, ...; default: the preset's)."""

    def workload(self) -> Workload:
        s = self.spec
        if self.model is None:
            if self.baseline or self.block_remat is not None:
                raise ValueError("--baseline and --block-remat need --model")
            return s.workload()
        config = preset(f"{self.model}-attn" if self.baseline else self.model)
        knobs = dict(precision=s.precision)
        if s.checkpoint_group != "default":
            knobs.update(checkpoint_group=s.checkpoint_group)
        if s.remat_policy is not None:
            knobs.update(inner_remat_policy=s.remat_policy)
        if self.block_remat is not None:
            knobs.update(block_remat=self.block_remat)
        return ModelWorkload(dataclasses.replace(config, **knobs))


@dataclasses.dataclass(frozen=True)
class ReportArgs:
    """Forward, forward+backward (and training-step) memory of a layer or a model."""

    target: tyro.conf.OmitArgPrefixes[Target] = Target()
    json: bool = False
    """Print JSON instead of the table."""
    measure: bool = False
    """Also run on the device and read its allocator (GPU); run one config per process."""


@dataclasses.dataclass(frozen=True)
class PlanArgs:
    """Remat settings and the longest sequence (or largest batch) that fit a memory budget."""

    budget: str
    """Device memory, e.g. 24GiB, 80GB, 1.5e9, or `device` (the GPU's own limit)."""
    target: tyro.conf.OmitArgPrefixes[Target] = Target()
    search: Literal["seq", "batch"] = "seq"
    """What to maximise: the sequence length at --batch, or the batch size at --seq."""
    json: bool = False
    """Print JSON instead of the summary."""


def device_budget() -> int:
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"{jax.default_backend()} keeps no memory limit; give --budget a size")
    return int(stats["bytes_limit"])


def main() -> None:
    args = tyro.extras.subcommand_cli_from_dict({"report": ReportArgs, "plan": PlanArgs})
    spec = args.target.spec
    workload = args.target.workload()
    if isinstance(args, ReportArgs):
        report = workload_report(workload, spec.batch, spec.seq, measure=args.measure)
        print(report.to_json() if args.json else report.table())
        return
    budget = device_budget() if args.budget == "device" else parse_bytes(args.budget)
    fixed = dict(seq=spec.seq) if args.search == "batch" else {}
    result = plan(workload, budget, batch=spec.batch, **fixed)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())


if __name__ == "__main__":
    main()
