"""`--init-from PATH`: start a run from a pretrained model instead of a random init.

`PATH` is a Hugging Face checkpoint directory (`config.json` with a `model_type`, safetensors
weights, usually a `tokenizer.json`; read by `ttt_jax.convert`) or a ttt-jax run directory
(`config.json` with a `model`, `checkpoints/<step>/`; the parameters of its newest step whose
checksums verify, `train.checkpoint`). The
checkpoint decides the model's architecture (`pretrained_config`): the `--model.*` flags may set
what does not change the pretrained parameters (precision, remat, family options, the retrofit:
`--model.retrofit.*`) and nothing else (`check_architecture`). The retrofitted model's
parameters are the pretrained ones placed by `ttt_jax.models.retrofit.retrofit_params`.

A run that finds its own checkpoint resumes from it: the pretrained weights are read only when
a run starts (`train.state.Setup.init_state`), never again on resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import typing

from ttt_jax.convert.hf_config import ARCHITECTURE_FIELDS
from ttt_jax.models import ModelConfig
from ttt_jax.models.config import OPTIONS, migrate_flat_fields

log = logging.getLogger("train")


def _read_json(path: str, flag: str = "--init-from") -> dict:
    config = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is not a directory")
    if not os.path.isfile(config):
        raise ValueError(
            f"{flag} {path!r} has no config.json (a Hugging Face checkpoint or a ttt-jax run "
            "directory)"
        )
    try:
        with open(config) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag}: {config} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag}: {config} is not a JSON object")
    return data


def is_run_dir(path: str) -> bool:
    """Whether `path` holds a ttt-jax run (its config.json has a `model`), not an HF checkpoint."""
    return isinstance(_read_json(path).get("model"), dict)


def _options(kind, value: dict):
    hints = typing.get_type_hints(kind)
    fields = {}
    for f in dataclasses.fields(kind):
        if f.name in value:
            v = value[f.name]
            fields[f.name] = tuple(v) if typing.get_origin(hints[f.name]) is tuple else v
    return kind(**fields)


def model_from_json(model: dict) -> ModelConfig:
    """A `ModelConfig` from its JSON (`dataclasses.asdict`, a run's config.json `model`)."""
    model = migrate_flat_fields(model)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in model.items() if k in fields}
    for section, kind in OPTIONS.items():
        if section in values:
            values[section] = _options(kind, values[section])
    values["pattern"] = tuple(values.get("pattern", ModelConfig.pattern))
    return ModelConfig(**values)


def pretrained_config(path: str) -> ModelConfig:
    """The `ModelConfig` of the pretrained model at `path` (module docstring)."""
    data = _read_json(path)
    if isinstance(data.get("model"), dict):
        model = model_from_json(data["model"])
        if model.retrofit.active:
            raise ValueError(
                f"--init-from {path!r} is a retrofitted run: resume it (--run-dir) rather than "
                "retrofit it again"
            )
        return model
    from ttt_jax.convert import config_from_hf

    return config_from_hf(path)


def default_tokenizer(path: str) -> str | None:
    """The tokenizer that goes with the checkpoint: an HF directory's `tokenizer.json`, or the
    run's own `data.tokenizer`; None when there is none."""
    data = _read_json(path)
    if isinstance(data.get("model"), dict):
        spec = (data.get("data") or {}).get("tokenizer")
        return spec if spec == "bytes" or (spec and os.path.isfile(spec)) else None
    tok = os.path.join(path, "tokenizer.json")
    return tok if os.path.isfile(tok) else None


def check_architecture(model: ModelConfig, pretrained: ModelConfig) -> None:
    """ValueError naming the first `--model.*` flag that changes what the checkpoint decides."""
    for field in ARCHITECTURE_FIELDS:
        mine, theirs = getattr(model, field), getattr(pretrained, field)
        if mine != theirs:
            flag = f"--model.{field.replace('_', '-')}"
            raise ValueError(
                f"{flag} is decided by the --init-from checkpoint ({theirs!r}), got {mine!r}: "
                "only options that keep the pretrained weights (precision, remat, family "
                "options, --model.retrofit.*) may change"
            )


def check(cfg) -> None:
    """ValueError (naming the flag) for a `TrainConfig` whose `init_from` cannot start it: no
    checkpoint there, a `--model.*` flag that changes its architecture, or the stdlib corpus's
    bytes for an HF checkpoint's tokens."""
    path = cfg.init_from
    if path is None:
        return
    check_architecture(cfg.model, pretrained_config(path))
    if cfg.data.source == "stdlib" and not is_run_dir(path):
        raise ValueError(
            "the stdlib corpus is raw bytes, not the tokens of the --init-from checkpoint: pass "
            "--data.source text --data.path FILE_OR_DIR (read with its tokenizer)"
        )


def load_pretrained_params(path: str, config: ModelConfig, shardings) -> dict:
    """The pretrained params of `config` (the model without its retrofit) from `path`, laid
    out in `shardings` (a tree of shardings shaped like the params)."""
    import jax

    if is_run_dir(path):
        from train.checkpoint import Checkpointer, CheckpointError
        from train.config import CheckpointConfig

        if not os.path.isdir(os.path.join(path, "checkpoints")):
            raise ValueError(f"--init-from {path!r} is a run directory without checkpoints")
        # The newest step whose params match their checksums; a corrupt one is skipped with a
        # warning, never used (the same verification as resuming).
        source = Checkpointer(path, CheckpointConfig(async_save=False))
        try:
            step, params = source.restore_latest_params()
        except CheckpointError as err:
            raise ValueError(f"--init-from {path!r}: {err}") from None
        finally:
            source.close()
        log.info("--init-from %s: params of step %d (checksums verified)", path, step)
        params = _int_keys(params)
        return jax.tree.map(jax.device_put, params, shardings)
    from ttt_jax.convert import load_pretrained

    loaded, params = load_pretrained(path, shardings=shardings)
    check_architecture(config, loaded)
    return params


def _int_keys(tree):
    """Orbax restores the integer keys of `groups/blocks` as strings."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
                for k, v in tree.items()}  # fmt: skip
    return tree
