"""`python -m train`: parse flags, start the distributed runtime, train.

Exit codes: 0 done, 2 bad configuration, 3 non-finite loss, 75 stopped by SIGTERM/SIGINT
with a checkpoint saved (run the same command again to resume).

Main job (tiny preset on the embedded stdlib corpus, 2 CPU cores, a few minutes):

    python -m train
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from train.cli import parse
    from train.signals import EXIT_CONFIG

    try:
        cfg = parse(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    from train.distributed import initialize

    initialize(cfg.dist)
    from train.loop import run

    try:
        return run(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
