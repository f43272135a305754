"""Checkpoints: a run stopped after N steps and resumed equals an uninterrupted 2N-step run
(loss curve and parameters to 1e-6); a corrupt or partial newest checkpoint is skipped with a
warning and the previous one used; one flipped byte is caught by the checksums and the resumed
run still equals the uninterrupted one; with no usable checkpoint the run stops (exit 4)
without touching anything, and `--fresh` starts over; SIGTERM finishes the step, saves, exits
75, and resumes. Fault injection on the checkpointer itself: tests/train/test_checkpoint.py."""

from __future__ import annotations

import hashlib
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests._train_helpers import MICRO_ARGS, ROOT, env, final_params, metrics, train


def run_args(run_dir, *extra):
    return [
        *MICRO_ARGS,
        "--steps",
        "8",
        "--checkpoint.every",
        "4",
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def assert_same_params(a, b, tol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.linalg.norm(x - y) <= tol * max(np.linalg.norm(y), 1e-30)


def test_resume_is_exact_and_corrupt_checkpoints_are_skipped(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(run_args(whole, "--log.tensorboard"))
    assert list((whole / "tensorboard").glob("events.out.tfevents.*"))
    first = train(run_args(parts, "--stop-after", "4"))
    assert "stopped after step 4" in first.stdout
    second = train(run_args(parts))
    assert "resumed from step 4" in second.stdout
    a, b = metrics(whole), metrics(parts)
    assert [m["step"] for m in b] == list(range(1, 9))
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-6)
    assert_same_params(final_params(parts, 8), final_params(whole, 8))

    # Corrupt the newest checkpoint (8) and leave a partial, never-finalised one (12).
    for f in (whole / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    (whole / "checkpoints" / "12.orbax-checkpoint-tmp-1").mkdir()
    third = train(run_args(whole))
    assert "checkpoint at step 8" in third.stderr and "unreadable" in third.stderr
    assert "resumed from step 4" in third.stdout
    assert_same_params(final_params(whole, 8), final_params(parts, 8))


def flip_a_byte(step_dir: pathlib.Path) -> None:
    """One flipped byte in the middle of the largest array file: Orbax alone restores it."""
    big = max(
        (f for f in (step_dir / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size
    )
    raw = bytearray(big.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    big.write_bytes(bytes(raw))


def snapshot(path: pathlib.Path) -> dict:
    return {
        str(f.relative_to(path)): hashlib.sha1(f.read_bytes()).hexdigest() if f.is_file() else "dir"
        for f in sorted(path.rglob("*"))
    }


@pytest.mark.slow
def test_corrupt_checkpoints_never_cost_the_run(tmp_path):
    run = tmp_path / "run"
    train(run_args(run))
    expected = final_params(run, 8)
    flip_a_byte(run / "checkpoints" / "8")
    again = train(run_args(run))
    assert "checkpoint at step 8" in again.stderr and "checksum mismatch in array" in again.stderr
    assert "resumed from step 4" in again.stdout
    assert_same_params(final_params(run, 8), expected)
    assert (run / "checkpoints" / "8.unreadable").is_dir()  # the corrupt step is kept aside

    # No usable checkpoint: stop with exit 4 and one line, and change nothing (metrics included).
    flip_a_byte(run / "checkpoints" / "4")
    flip_a_byte(run / "checkpoints" / "8")
    before = snapshot(run)
    stuck = train(run_args(run), check=False)
    assert stuck.returncode == 4, stuck.stderr[-3000:]
    errors = [ln for ln in stuck.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "none of the 2 checkpoints" in errors[0] and "--fresh" in errors[0]
    assert "Traceback" not in stuck.stderr and "new run" not in stuck.stdout
    assert snapshot(run) == before
    fresh = train(run_args(run, "--fresh", "--stop-after", "4"))
    assert "new run" in fresh.stdout and "stopped after step 4" in fresh.stdout
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]


def test_sigterm_saves_at_a_step_boundary_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *MICRO_ARGS,
        "--steps",
        "100000",
        "--checkpoint.every",
        "100000",
        "--run-dir",
        str(run_dir),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = pathlib.Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "interrupted by signal" in out
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and steps[0] >= 3
    saved = steps[0]
    # Same steps (the schedule, so the compiled step, is unchanged), stopping 2 steps later.
    resumed = train([*args, "--stop-after", str(saved + 2)])
    assert f"resumed from step {saved}" in resumed.stdout
    assert [m["step"] for m in metrics(run_dir)][-2:] == [saved + 1, saved + 2]
