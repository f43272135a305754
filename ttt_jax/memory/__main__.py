"""`python -m ttt_jax.memory report ...`: the memory report on the command line.

Example (CPU, abstract shapes, nothing allocated; add --measure on a GPU):

    python -m ttt_jax.memory report --layer ttt_linear --seq 8192 --batch 1 --checkpoint-group 4
"""

from __future__ import annotations

import dataclasses

import tyro

from ttt_jax.memory.report import LayerSpec, layer_report


@dataclasses.dataclass(frozen=True)
class ReportArgs:
    """Forward and forward+backward memory of one layer."""

    spec: tyro.conf.OmitArgPrefixes[LayerSpec] = LayerSpec()
    json: bool = False
    """Print JSON instead of the table."""
    measure: bool = False
    """Also run on the device and read its allocator (GPU); run one config per process."""


def main() -> None:
    args = tyro.extras.subcommand_cli_from_dict({"report": ReportArgs})
    report = layer_report(args.spec, measure=args.measure)
    print(report.to_json() if args.json else report.table())


if __name__ == "__main__":
    main()
