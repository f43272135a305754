"""The command line: `python -m train [--preset NAME] [--field value ...]`.

The preset (or `--init-from`'s checkpoint, whose model and tokenizer become the defaults:
`train.init_from`) is read first so that `--model.*` flags override the chosen model's fields,
not the default one's; everything else is tyro over `TrainConfig`. The same flags are first parsed
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


def _init_from_defaults(default: TrainConfig, known: argparse.Namespace) -> TrainConfig:
    """`default` with `--init-from`'s model and tokenizer. The data flags are read here too:
    the default must be a valid config, and the checkpoint's model is one only with its data
    (an HF checkpoint's vocab is not the stdlib corpus's bytes)."""
    from train.init_from import default_tokenizer, pretrained_config

    path = known.init_from
    model = pretrained_config(path)
    data = {k: v for k, v in (("source", known.source), ("path", known.path)) if v is not None}
    tokenizer = default_tokenizer(path)
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
    data = dataclasses.replace(default.data, **data)
    return dataclasses.replace(default, model=model, data=data, init_from=path)


def parse(argv: list[str] | None = None) -> TrainConfig:
    """`TrainConfig` from the command line (validation errors propagate as ValueError)."""
    from train.init_from import check

    cfg = _parse(argv)
    check(cfg)
    return cfg


def _parse(argv: list[str] | None) -> TrainConfig:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--init-from", "--init_from", dest="init_from", default=None)
    pre.add_argument("--data.source", dest="source", default=None)
    pre.add_argument("--data.path", dest="path", default=None)
    known, _ = pre.parse_known_args(argv)
    name = TrainConfig.preset if known.preset is None else known.preset
    default = dataclasses.replace(TrainConfig(), preset=name, model=preset(name))
    if known.init_from is not None:
        if known.preset is not None:
            raise ValueError("--preset and --init-from both choose the model: pass one of them")
        default = _init_from_defaults(default, known)
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
