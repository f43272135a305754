"""The command line: `python -m train [--preset NAME] [--field value ...]`.

The preset is read first so that `--model.*` flags override the chosen preset's fields, not
the default one's; everything else is tyro over `TrainConfig`. The same flags are first parsed
by `train.flags` (plain argparse): its validation errors are the project's `ValueError`s, which
`python -m train` prints as one line naming the flag (tyro would wrap them in a box); tyro then
builds the config (and explains malformed flags, with suggestions). Without tyro installed (a
bare GPU image), `train.flags` alone parses the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from train.config import TrainConfig
from train.flags import FlagSyntaxError, parse_dataclass
from ttt_jax.models import ModelConfig, preset

DESCRIPTION = "Train a decoder LM with TTT layers (ttt-jax)."


def _bare_fields(cls, prefix: str) -> dict[str, str]:
    """Unambiguous field names (with an underscore) of `cls` -> their flags."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: f"{prefix}{f.name.replace('_', '-')}"
        for f in dataclasses.fields(cls)
        if "_" in f.name and not dataclasses.is_dataclass(hints[f.name])
    }


# Config field -> flag, for error messages that name a field (`ttt_jax.cli.with_flags`):
# `TrainConfig.steps`, and the bare names (`num_heads=3`) of the model's and the run's fields.
FLAGS = {
    **_bare_fields(ModelConfig, "--model."),
    **_bare_fields(TrainConfig, "--"),
    "TrainConfig.": "--",
    "ModelConfig.": "--model.",
    "DataConfig.": "--data.",
    "OptimConfig.": "--optim.",
    "MeshConfig.": "--mesh.",
    "CheckpointConfig.": "--checkpoint.",
    "LogConfig.": "--log.",
    "DistributedConfig.": "--dist.",
}


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
    if not {"-h", "--help"} & set(argv):
        try:
            parse_dataclass(TrainConfig, default, argv, DESCRIPTION, exit_on_error=False)
        except FlagSyntaxError:
            pass  # tyro reports it
    return tyro.cli(TrainConfig, default=default, args=argv, description=DESCRIPTION)
