"""What verified checkpoints cost (issue 20): save time with and without the checksum
manifest, for a model preset's full train state (parameters + AdamW moments).

Both variants go through `train.checkpoint.Checkpointer` (Orbax, async as in training); the
only difference is `checksums=False`, which skips the manifest (and so could never be
restored by the trainer: it is here only as the baseline). Per variant:

- `blocking`: time until `save()` returns, i.e. what the training loop waits for (with
  checksums: the checksum pass on the devices, then Orbax's copy to host);
- `written`: time until the step is committed on disk (`save()` + `wait()`);
- first save separately (it compiles the checksum function once per process), then the median
  of `--iters` saves.

Also `checksum` (the jitted checksum pass alone, median) and `restore + verify` against a
plain Orbax restore of the same step. Every save goes to a fresh directory under `--dir`
(default: a temporary one, deleted afterwards).

    PYTHONPATH=. python benchmarks/bench_checkpoint.py --out $OUT/checkpoint        # GPU, 125m
    PYTHONPATH=. python benchmarks/bench_checkpoint.py --preset tiny --smoke         # CPU

The 125m state is ~1.5 GB (fp32 params and two moments); the GPU run takes a minute or two
plus the compile of the init. Writes `checkpoint.json` under `--out` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from harness import environment, markdown_table  # noqa: E402


def measure(preset_name: str, iters: int, base: Path) -> dict:
    import jax
    import orbax.checkpoint as ocp

    from train.checkpoint import Checkpointer
    from train.checksum import tree_checksums
    from train.config import CheckpointConfig, TrainConfig
    from train.sharding import make_mesh
    from train.state import make_setup
    from ttt_jax.models import preset

    cfg = dataclasses.replace(TrainConfig(), preset=preset_name, model=preset(preset_name))
    mesh = make_mesh(cfg.mesh.sizes)
    setup = make_setup(cfg, mesh)
    state = jax.block_until_ready(setup.init_state())
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    data = {"batches": 0, "fingerprint": "bench"}
    ckpt_cfg = CheckpointConfig(keep_last=10**6, async_save=True)

    t0 = time.perf_counter()
    tree_checksums(state)
    checksum_first = time.perf_counter() - t0
    times = []
    for _ in range(max(iters, 3)):
        t0 = time.perf_counter()
        tree_checksums(state)
        times.append(time.perf_counter() - t0)
    checksum_s = statistics.median(times)

    rows = []
    for checksums in (False, True):
        blocking, written = [], []
        for i in range(iters + 1):
            run_dir = base / f"{'verified' if checksums else 'plain'}-{i}"
            ckpt = Checkpointer(str(run_dir), ckpt_cfg, checksums=checksums)
            t0 = time.perf_counter()
            ckpt.save(1, state, data)
            t1 = time.perf_counter()
            ckpt.wait()
            t2 = time.perf_counter()
            ckpt.close()
            blocking.append(t1 - t0)
            written.append(t2 - t0)
            if i < iters:  # keep the last one for the restore timing
                shutil.rmtree(run_dir)
        rows.append(
            dict(
                variant="with checksums" if checksums else "without (baseline)",
                first_blocking_s=blocking[0],
                first_written_s=written[0],
                blocking_s=statistics.median(blocking[1:]),
                written_s=statistics.median(written[1:]),
            )
        )
    verified_dir = base / f"verified-{iters}"
    plain = ocp.CheckpointManager(str(verified_dir / "checkpoints"))
    args = ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state))
    t0 = time.perf_counter()
    jax.block_until_ready(plain.restore(1, args=args)["state"])
    restore_plain = time.perf_counter() - t0
    plain.close()
    ckpt = Checkpointer(str(verified_dir), ckpt_cfg)
    t0 = time.perf_counter()
    step, restored, _ = ckpt.restore_latest(setup.abstract_state)
    jax.block_until_ready(restored)
    restore_verified = time.perf_counter() - t0
    ckpt.close()
    assert step == 1
    return dict(
        preset=preset_name,
        state_bytes=nbytes,
        state_leaves=len(jax.tree.leaves(state)),
        iters=iters,
        checksum_first_s=checksum_first,
        checksum_s=checksum_s,
        restore_plain_s=restore_plain,
        restore_verified_s=restore_verified,
        rows=rows,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="125m", help="ttt_jax.models preset (default 125m)")
    p.add_argument("--iters", type=int, default=5, help="saves per variant after the first")
    p.add_argument("--smoke", action="store_true", help="2 iterations (CPU check)")
    p.add_argument("--dir", help="where to write the checkpoints (default: a temporary dir)")
    p.add_argument("--out", help="directory for checkpoint.json")
    a = p.parse_args()
    iters = 2 if a.smoke else a.iters
    if iters < 1:
        p.error("--iters must be >= 1")
    base = Path(a.dir or tempfile.mkdtemp(prefix="bench-checkpoint-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(a.preset, iters, base)
    finally:
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)
    command = "PYTHONPATH=. python benchmarks/bench_checkpoint.py " + " ".join(sys.argv[1:])
    env = environment()
    import orbax.checkpoint as ocp

    env["orbax"] = getattr(ocp, "__version__", "?")
    base_row, ver_row = result["rows"]
    for r in result["rows"]:
        r["blocking_vs_baseline"] = r["blocking_s"] / base_row["blocking_s"]
        r["written_vs_baseline"] = r["written_s"] / base_row["written_s"]
    print(command)
    print(json.dumps(env))
    print(
        f"preset {result['preset']}: state {result['state_bytes'] / 2**20:,.1f} MiB in "
        f"{result['state_leaves']} arrays; checksum pass {1e3 * result['checksum_s']:.1f} ms "
        f"(first, with compile: {1e3 * result['checksum_first_s']:.0f} ms); restore "
        f"{result['restore_plain_s']:.2f} s plain vs {result['restore_verified_s']:.2f} s "
        "with verification (both include the first, compiling, call)"
    )
    cols = [
        ("variant", "save"),
        ("first_blocking_s", "first: blocking s"),
        ("first_written_s", "first: written s"),
        ("blocking_s", f"blocking s (median of {iters})"),
        ("written_s", f"written s (median of {iters})"),
        ("blocking_vs_baseline", "blocking / baseline"),
        ("written_vs_baseline", "written / baseline"),
    ]
    print(markdown_table(result["rows"], cols))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint.json").write_text(
            json.dumps(dict(environment=env, command=command, **result), indent=2) + "\n"
        )
    del ver_row


if __name__ == "__main__":
    main()
