"""The command line: `python -m train [--preset NAME] [--field value ...]`.

The preset is read first so that `--model.*` flags override the chosen preset's fields, not
the default one's; everything else is tyro over `TrainConfig`. Without tyro installed (a bare
GPU image), `train.flags` parses the same flags with argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from train.config import TrainConfig
from train.flags import parse_dataclass
from ttt_jax.models import preset

DESCRIPTION = "Train a decoder LM with TTT layers (ttt-jax)."


def parse(argv: list[str] | None = None) -> TrainConfig:
    """`TrainConfig` from the command line (validation errors propagate as ValueError)."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=TrainConfig.preset)
    known, _ = pre.parse_known_args(argv)
    model = preset(known.preset)
    default = dataclasses.replace(TrainConfig(), preset=known.preset, model=model)
    try:
        import tyro
    except ImportError:
        logging.getLogger("train").info("tyro is not installed: plain argparse flags")
        return parse_dataclass(TrainConfig, default, argv, DESCRIPTION)
    return tyro.cli(TrainConfig, default=default, args=argv, description=DESCRIPTION)
