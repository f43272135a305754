"""`python -m train`: parse flags, start the distributed runtime, train.

Exit codes: 0 done, 2 bad configuration or arguments (one line on stderr naming the flag, no
traceback), 3 non-finite loss, 4 the run directory holds checkpoints of which none can be
restored (nothing is changed; `--fresh` starts over), 75 stopped by SIGTERM/SIGINT with a
checkpoint saved (run the same command again to resume).

Main job (tiny preset on the embedded stdlib corpus, 2 CPU cores, a few minutes):

    python -m train
"""

from __future__ import annotations

import logging
import os
import sys

from ttt_jax.cli import run_cli

# Code under these directories raises the user errors (`ttt_jax.cli`).
ROOTS = (
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.abspath(__import__("ttt_jax").__file__)),
)


def _train(argv: list[str] | None) -> int:
    from train.cli import parse

    cfg = parse(argv)
    from train.distributed import initialize

    initialize(cfg.dist)
    from train.loop import run

    return run(cfg)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from train.checkpoint import CheckpointError
    from train.cli import FLAGS
    from train.signals import EXIT_CHECKPOINT

    return run_cli(
        lambda: _train(argv),
        fields=FLAGS,
        roots=ROOTS,
        codes={CheckpointError: EXIT_CHECKPOINT},
    )


if __name__ == "__main__":
    sys.exit(main())
