"""Shared by the training tests: a micro model on MQAR, and running `python -m train` in a
subprocess with a persistent compilation cache shared by the test session."""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# The repository root: `train` is a top-level folder, not an installed package (pytest has the
# root on sys.path through `pythonpath`; subprocesses get it through PYTHONPATH, `env`).
ROOT = pathlib.Path(__file__).resolve().parents[1]

# One XLA compilation cache for the whole test session: runs of the same config (most of them)
# compile once.
CACHE = pathlib.Path(tempfile.mkdtemp(prefix="ttt-jax-test-xla-cache-"))
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)

# Root without the capabilities that bypass file permissions obeys them like any user.
DROP_CAPS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]

MICRO_ARGS = [
    "--model.d-model", "32", "--model.num-heads", "2", "--model.d-ff", "64",
    "--model.num-layers", "2", "--model.ttt.mini-batch-size", "8", "--model.vocab-size", "32",
    "--seq", "16", "--batch-size", "8", "--data.source", "mqar", "--data.mqar-pairs", "3",
    "--data.mqar-vocab", "32", "--log.no-progress", "--log.every", "1",
    "--log.eval-batches", "1", "--optim.warmup-steps", "2", "--log.no-tensorboard",
]  # fmt: skip


def env(devices: int | None = None) -> dict:
    e = dict(os.environ)
    e.update(
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(CACHE),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    if devices:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def train(args, *, devices=None, timeout=300, check=True, **popen):
    """Runs `python -m train ARGS` to completion; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env=env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def metrics(run_dir) -> list[dict]:
    with open(pathlib.Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def final_params(run_dir, step: int):
    """The params saved at `step` as numpy arrays (no target structure needed)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(run_dir) / "checkpoints" / str(step) / "state"
    return ocp.StandardCheckpointer().restore(path.resolve())["params"]
