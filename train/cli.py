"""The command line: `python -m train [--preset NAME] [--field value ...]`.

The preset is read first so that `--model.*` flags override the chosen preset's fields, not
the default one's; everything else is tyro over `TrainConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from train.config import TrainConfig
from ttt_jax.models import preset


def parse(argv: list[str] | None = None) -> TrainConfig:
    """`TrainConfig` from the command line (validation errors propagate as ValueError)."""
    import tyro  # only the CLI needs tyro

    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=TrainConfig.preset)
    known, _ = pre.parse_known_args(argv)
    model = preset(known.preset)
    default = dataclasses.replace(TrainConfig(), preset=known.preset, model=model)
    return tyro.cli(
        TrainConfig,
        default=default,
        args=argv,
        description="Train a decoder LM with TTT layers (ttt-jax).",
    )
