"""`python -m ttt_jax.memory report|plan ...`: the memory report and planner on the command line.

Examples (CPU, abstract shapes, nothing allocated; add --measure to a report on a GPU):

    python -m ttt_jax.memory report --layer ttt_linear --seq 8192 --batch 1 --checkpoint-group 4
    python -m ttt_jax.memory report --layer lact --seq 32768 --checkpoint-group 4
    python -m ttt_jax.memory report --model 125m --seq 8192 --json
    python -m ttt_jax.memory report --model 125m --baseline --seq 8192
    python -m ttt_jax.memory plan --layer ttt_linear --budget 24GiB
    python -m ttt_jax.memory plan --model tiny --budget 8GiB --search batch --seq 4096

A report compiles the forward, the forward+backward (its peak is the backward peak) and, for a
model, the training step. A plan searches the longest sequence at `--batch` (or with
`--search batch` the largest batch at `--seq`) and the remat settings that fit `--budget`.

Plain argparse (no third-party CLI library), so it runs wherever jax and flax do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax

from ttt_jax.cli import run_cli
from ttt_jax.memory.layer_spec import BACKWARD_LAYERS, LAYERS, LayerSpec
from ttt_jax.memory.model_workload import ModelWorkload
from ttt_jax.memory.planner import parse_bytes, plan
from ttt_jax.memory.report import workload_report
from ttt_jax.memory.workload import Workload
from ttt_jax.models import PRESETS, preset
from ttt_jax.ops.core import POLICY_NAMES, resolve_policy


def _positive(text: str, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
    return value


def group_arg(text: str) -> int | None | str:
    """`--checkpoint-group`: an int, `none` (no remat) or `default`."""
    if text.lower() == "none":
        return None
    if text == "default":
        return text
    return _positive(text, "a positive int, 'none' or 'default'")


def positive_int(text: str) -> int:
    """An int >= 1 (argparse names the flag when it is not)."""
    return _positive(text, "a positive int")


def budget_arg(text: str) -> int | str:
    """`--budget`: a size > 0 (`24GiB`, `80GB`, `1.5e9`) or `device`."""
    if text == "device":
        return text
    try:
        value = parse_bytes(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size like 24GiB, 512MiB, 80GB or 1.5e9, or 'device'"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size > 0")
    return value


def policy_arg(text: str) -> str:
    """`--remat-policy` / `--block-remat`: a policy name (`ttt_jax.ops.core.remat`)."""
    try:
        resolve_policy(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


# Field names in the layer configs' and the planner's messages -> the flag that sets them.
FLAGS = {
    "LayerSpec.": "--",
    "d_model": "--d-model",
    "num_heads": "--heads",
    "num_fw_heads": "--heads",
    "mini_batch_size": "--mini-batch",
    "chunk_size": "--chunk",
    "d_ff": "--d-ff",
    "checkpoint_group": "--checkpoint-group",
    "remat_policy": "--remat-policy",
    "block_remat": "--block-remat",
    "backward": "--backward",
    "seq": "--seq",
    "batch": "--batch",
    "budget_bytes": "--budget",
}


def add_target_args(p: argparse.ArgumentParser) -> None:
    d = LayerSpec()
    layer = p.add_argument_group("layer (ignored with --model but for the scan knobs)")
    layer.add_argument("--layer", choices=LAYERS, default=d.layer, help="the layer to compile")
    layer.add_argument("--seq", type=positive_int, default=d.seq, help="sequence length T")
    layer.add_argument("--batch", type=positive_int, default=d.batch, help="batch size B")
    layer.add_argument("--d-model", type=positive_int, default=d.d_model, help="model width")
    layer.add_argument("--heads", type=positive_int, default=d.heads, help="heads (TTT and LaCT)")
    layer.add_argument(
        "--mini-batch", type=positive_int, default=d.mini_batch, help="TTT mini-batch C"
    )
    layer.add_argument(
        "--chunk",
        type=positive_int,
        default=None,
        help="chunk of lact (default 2048) and inplace_ttt (1024)",
    )
    layer.add_argument(
        "--d-ff", type=positive_int, default=None, help="MLP width of inplace / npt (4d)"
    )
    layer.add_argument(
        "--backward",
        choices=("custom", "autodiff"),
        default=None,
        help=f"backward of {' / '.join(BACKWARD_LAYERS)} (default custom)",
    )
    knobs = p.add_argument_group("scan knobs and precision (layers and models)")
    knobs.add_argument(
        "--checkpoint-group",
        type=group_arg,
        default="default",
        help="inner-scan remat group: an int, none, or default (the config's own: 4 for TTT "
        "layers and the GPU model presets)",
    )
    knobs.add_argument(
        "--remat-policy",
        type=policy_arg,
        default=None,
        help=f"policy inside a group: {', '.join(POLICY_NAMES)} (default full)",
    )
    knobs.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="fp32, or bf16 compute with fp32 params and state (default: bf16 for a layer, "
        "the preset's for a model)",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--model",
        choices=[n for n in PRESETS if not n.endswith("-attn")],
        default=None,
        help="a ttt_jax.models preset instead of --layer",
    )
    model.add_argument(
        "--baseline", action="store_true", help="the preset's attention-only variant (NAME-attn)"
    )
    model.add_argument(
        "--block-remat",
        type=policy_arg,
        default=None,
        help=f"block remat policy: {', '.join(POLICY_NAMES)} (default: the preset's, none)",
    )


def layer_spec(a: argparse.Namespace) -> LayerSpec:
    """The `LayerSpec` of the flags (each flag is the field of the same name)."""
    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(LayerSpec)}
    return LayerSpec(**dict(values, precision=a.precision or "bf16"))


def target_workload(a: argparse.Namespace) -> Workload:
    """The layer (`--layer` and its shape) or the model preset (`--model`) the flags name."""
    if a.model is None:
        if a.baseline or a.block_remat is not None:
            raise ValueError("--baseline and --block-remat need --model")
        return layer_spec(a).workload()
    config = preset(f"{a.model}-attn" if a.baseline else a.model)
    if a.precision is not None:
        config = dataclasses.replace(config, precision=a.precision)
    workload = ModelWorkload(config)
    remat = workload.remat  # the preset's own, changed by the flags given
    if a.checkpoint_group != "default":
        remat = dataclasses.replace(remat, checkpoint_group=a.checkpoint_group)
    if a.remat_policy is not None:
        remat = dataclasses.replace(remat, remat_policy=a.remat_policy)
    if a.block_remat is not None:
        block = None if a.block_remat == "none" else a.block_remat
        remat = dataclasses.replace(remat, block_remat=block)
    return workload.with_remat(remat)


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (`--help` still prints the usage)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python -m ttt_jax.memory",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    report = sub.add_parser(
        "report", help="forward, fwd+bwd (and training-step) memory of a layer or a model"
    )
    add_target_args(report)
    report.add_argument("--json", action="store_true", help="print JSON instead of the table")
    report.add_argument(
        "--measure",
        action="store_true",
        help="also run on the device and read its allocator (GPU); one config per process",
    )
    planner = sub.add_parser(
        "plan", help="remat settings and the longest sequence (largest batch) fitting a budget"
    )
    planner.add_argument(
        "--budget",
        type=budget_arg,
        required=True,
        help="device memory, e.g. 24GiB, 80GB, 1.5e9, or `device` (the GPU's own limit)",
    )
    add_target_args(planner)
    planner.add_argument(
        "--search",
        choices=("seq", "batch"),
        default="seq",
        help="maximise the sequence at --batch, or the batch at --seq",
    )
    planner.add_argument("--json", action="store_true", help="print JSON instead of the summary")
    return p


def device_budget() -> int:
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"{jax.default_backend()} keeps no memory limit; give --budget a size")
    return int(stats["bytes_limit"])


def main(argv: list[str] | None = None) -> int:
    """Runs the command; a user error prints one line and returns 2 (`ttt_jax.cli`)."""
    return run_cli(lambda: _main(argv), fields=FLAGS)


def _main(argv: list[str] | None) -> None:
    a = parser().parse_args(sys.argv[1:] if argv is None else argv)
    workload = target_workload(a)
    if a.command == "report":
        report = workload_report(workload, a.batch, a.seq, measure=a.measure)
        print(report.to_json() if a.json else report.table())
        return
    budget = device_budget() if a.budget == "device" else a.budget
    fixed = dict(seq=a.seq) if a.search == "batch" else {}
    result = plan(workload, budget, batch=a.batch, **fixed)
    print(json.dumps(result.to_dict(), indent=2) if a.json else result.summary())


if __name__ == "__main__":
    sys.exit(main())
