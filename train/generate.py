"""`python -m train.generate`: continue a prompt with a trained run's model.

    python -m train.generate --run-dir runs/tiny --prompt "def main(" --max-new-tokens 64
    python -m train.generate --run-dir runs/tiny --prompt "import " --temperature 0.8 --top-p 0.95

Reads the run's `config.json`, restores its newest checkpoint that verifies (`train.checkpoint`:
every array against its checksum, a corrupt step skipped with a warning), encodes the prompt
with the run's tokenizer (`DataConfig.tokenizer`: bytes or a `tokenizer.json`) and decodes
with every layer's cache (`ttt_jax.models.generate`). Prints the continuation.

Exit codes: 0 done, 2 bad arguments or run directory (one line on stderr, no traceback), 4 the
run's checkpoints exist but none verifies.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from ttt_jax.cli import read_json, run_cli

ROOTS = (
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.abspath(__import__("ttt_jax").__file__)),
)


def _tuples(value):
    """JSON lists back to the tuples the configs hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _build(cls, data: dict, where: str, *, lenient: tuple[type, ...] = ()):
    """A config dataclass from its `dataclasses.asdict` JSON: nested sections rebuilt, lists as
    tuples, fields the run did not save at their defaults. A section whose class is in
    `lenient` is rebuilt without its own validation when that fails (the run's data config,
    whose files may have moved: generating needs only its tokenizer)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"{where} has fields this version does not know ({', '.join(unknown)}): a run of a "
            "newer ttt-jax?"
        )
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = _build(kind, value, f"{where}.{name}", lenient=lenient)
        else:
            value = _tuples(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError:
        if cls not in lenient:
            raise
        obj = object.__new__(cls)
        defaults = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
        for name, value in {**defaults, **kwargs}.items():
            object.__setattr__(obj, name, value)
        return obj


def load_run(run_dir: str):
    """`(TrainConfig, LM, step)` of the newest verified checkpoint in `run_dir`."""
    from flax import nnx

    from train.checkpoint import Checkpointer
    from train.config import MeshConfig, TrainConfig
    from train.sharding import make_mesh
    from train.state import make_setup
    from ttt_jax.data import DataConfig
    from ttt_jax.models.config import migrate_flat_fields

    file = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise ValueError(f"--run-dir {run_dir!r} is not a directory")
    saved = read_json(file, f"--run-dir {run_dir!r} has no config.json (not a training run)")
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ValueError(f"{file} does not hold a training run's config (no model section)")
    saved = dict(saved, model=migrate_flat_fields(saved["model"]))
    cfg = _build(TrainConfig, saved, "config.json", lenient=(DataConfig,))
    # Restored onto one device: generation runs a batch of one prompt.
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=1, fsdp=1, tensor=1, rules=cfg.mesh.rules))
    import jax

    mesh = make_mesh(cfg.mesh.sizes, jax.devices()[:1])
    setup = make_setup(cfg, mesh)
    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    restored = ckpt.restore_latest(setup.abstract_state)
    if restored is None:
        raise ValueError(f"--run-dir {run_dir!r} has no checkpoints yet: train it first")
    step, state, _ = restored
    ckpt.close()
    return cfg, nnx.merge(setup.graphdef, state["params"]), step


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train.generate", description="Continue a prompt with a trained run."
    )
    p.add_argument("--run-dir", required=True, help="the run directory (python -m train's)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling key (with --temperature > 0)")
    return p.parse_args(argv)


def _generate(argv: list[str] | None) -> int:
    args = parse(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        raise ValueError("--prompt must not be empty")
    import jax

    from ttt_jax.data.tokenizer import make_tokenizer
    from ttt_jax.models.generate import generate

    cfg, model, step = load_run(args.run_dir)
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    ids = tokenizer.encode(args.prompt)
    vocab = cfg.model.vocab_size
    if ids.size and ids.max() >= vocab:
        raise ValueError(
            f"--prompt: the run's tokenizer ({cfg.data.tokenizer}) gives ids up to "
            f"{int(ids.max())}, outside the model's vocab of {vocab} (a run on token data such "
            "as mqar has no text tokenizer)"
        )
    logging.getLogger("train").info("step %d of %s", step, args.run_dir)
    out = generate(
        model,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        rng=jax.random.key(args.seed),
    )
    print(tokenizer.decode(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from train.checkpoint import CheckpointError
    from train.signals import EXIT_CHECKPOINT

    return run_cli(lambda: _generate(argv), roots=ROOTS, codes={CheckpointError: EXIT_CHECKPOINT})


if __name__ == "__main__":
    sys.exit(main())
