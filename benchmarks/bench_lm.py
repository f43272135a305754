"""Whole-model training benchmark: `python -m train` once per preset (a fresh process each, so
every allocator peak is its own), then one side-by-side table of throughput, MFU, peak memory
and the loss curves, with the environment line. Extra `python -m train` flags go after `--`.

Issue 7's H100 comparison (125m with TTT-Linear in every other block vs attention only, T=8192;
a few minutes of device time):

    python benchmarks/bench_lm.py --presets 125m 125m-attn --seq 8192 --batch-size 4 \\
        --steps 300 --out benchmarks/results/lm_125m_t8192_h100.json

Two GPUs (data parallel, then FSDP): add `-- --mesh.data 2` or `-- --mesh.data 1 --mesh.fsdp 2`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import environment  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(preset: str, args, extra: list[str]) -> list[dict]:
    run_dir = pathlib.Path(args.run_root) / f"{preset}-t{args.seq}"
    cmd = [sys.executable, "-m", "train", "--preset", preset, "--seq", str(args.seq),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--fresh",
           "--run-dir", str(run_dir), "--log.every", "1", "--log.eval-every", str(args.steps),
           "--checkpoint.every", str(args.steps), "--log.no-progress",
           "--data.no-segments", *extra]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(records: list[dict], warmup: int) -> dict:
    """Medians over the steps after `warmup` (the first steps include compile and caches)."""
    steady = [r for r in records if r["step"] > warmup] or records

    def med(key):
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    peak = max((r.get("peak_memory_bytes") or 0 for r in records), default=0)
    return {
        "step_time_s": med("step_time_s"),
        "tokens_per_s": med("tokens_per_s"),
        "tokens_per_s_per_device": med("tokens_per_s_per_device"),
        "mfu": med("mfu"),
        "peak_memory_gib": peak / 2**30 if peak else None,
        "final_loss": records[-1]["loss"],
        "eval_loss": next((r["eval_loss"] for r in reversed(records) if "eval_loss" in r), None),
    }


def _cell(v, spec):
    return "n/a" if v is None else format(v, spec)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["125m", "125m-attn"])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--curve-every", type=int, default=25)
    p.add_argument("--run-root", default="runs/bench_lm")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    curves = {name: run(name, args, extra) for name in args.presets}
    rows = {name: summarise(recs, args.warmup) for name, recs in curves.items()}
    env = environment()
    print(f"\n{json.dumps(env)}\nT={args.seq} batch={args.batch_size} steps={args.steps} "
          f"flags: {' '.join(extra) or '-'}\n")  # fmt: skip
    print("| preset | step (s) | tokens/s | tokens/s/device | MFU | peak memory | final loss |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {_cell(r['step_time_s'], '.3f')} | {_cell(r['tokens_per_s'], ',.0f')} "
              f"| {_cell(r['tokens_per_s_per_device'], ',.0f')} | {_cell(r['mfu'], '.1%')} "
              f"| {_cell(r['peak_memory_gib'], '.1f')} GiB | {r['final_loss']:.4f} |")  # fmt: skip
    print("\n| step | " + " | ".join(curves) + " |\n|---|" + "---|" * len(curves))
    for step in range(args.curve_every, args.steps + 1, args.curve_every):
        losses = [next((r["loss"] for r in c if r["step"] == step), None) for c in curves.values()]
        print(f"| {step} | " + " | ".join(_cell(v, ".4f") for v in losses) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "args": vars(args), "extra": extra, "summary": rows,
                       "curves": curves}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
