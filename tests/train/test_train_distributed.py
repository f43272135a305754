"""The multi-host path on one machine: two processes joined by `jax.distributed` (CPU
collectives over gloo), one device each, a data=2 mesh, each process building only its own
rows of the batch. The loss curve equals the single-process run's; checkpoints are written."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np

from tests._train_helpers import MICRO_ARGS, ROOT, env, metrics, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    common = [*MICRO_ARGS, "--steps", "8", "--checkpoint.every", "4", "--stop-after", "3"]
    train([*common, "--run-dir", str(tmp_path / "one")])
    port, run_dir = free_port(), tmp_path / "two"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "train",
                *common,
                "--run-dir",
                str(run_dir),
                "--dist.coordinator",
                f"127.0.0.1:{port}",
                "--dist.num-processes",
                "2",
                "--dist.process-id",
                str(i),
            ],  # fmt: skip
            cwd=ROOT,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    assert "over 2 process(es) | mesh data=2" in outs[0][0]
    # Only process 0 prints; gloo's C++ connection notice ("[Gloo] Rank 1 is connected ...")
    # goes to stdout by itself and is not ours.
    assert [
        ln for ln in outs[1][0].splitlines() if ln.strip() and not ln.startswith("[Gloo]")
    ] == []
    two, one = metrics(run_dir), metrics(tmp_path / "one")
    assert [m["step"] for m in two] == [1, 2, 3]
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-5)
    assert (run_dir / "checkpoints" / "3").is_dir()
