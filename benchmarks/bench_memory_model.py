"""Training memory of the LM with TTT-Linear in every other block vs the attention-only model,
side by side from one run (the memory headline of issue 6; users saw 2.24x: 44.2 vs 19.7 GB).

Per config, in a fresh process (the allocator's peak counter cannot be reset): one training
step (forward, backward, AdamW update; parameters and optimizer state donated) at bf16 compute,
and from the allocator `peak_bytes_in_use` after it (`peak`), `bytes_in_use` before it
(`state`: parameters, optimizer state, tokens) and after it (`steady`), `efficiency =
steady / peak`; beside them the compiler's planned peak of the same step. The ratio column is
each TTT row's peak over the attention-only row with the same shape and remat settings.

    PYTHONPATH=. python benchmarks/bench_memory_model.py --json $OUT/memory_model.json  # GPU
    PYTHONPATH=. python benchmarks/bench_memory_model.py --smoke                         # CPU

Remat variants (`--remat`): `preset` (the preset's own settings), `block_full` (full block
remat, scan group 4), `block_dots` (block remat keeping matmul outputs without batch dims).
About 10 minutes on one H100 for the defaults (125m at T = 2048, 8192, 32768).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, markdown_table, run_in_subprocess  # noqa: E402

REMATS = {
    "preset": None,
    "block_full": dict(checkpoint_group=4, block_remat="full"),
    "block_dots": dict(checkpoint_group=4, block_remat="dots_no_batch"),
}


def run_one(cfg: dict) -> dict:
    import dataclasses

    import jax

    from ttt_jax.memory import ModelWorkload, Remat
    from ttt_jax.models import preset

    config = dataclasses.replace(preset(cfg["preset"]), precision="bf16")
    if cfg["smoke"]:
        config = dataclasses.replace(config, vocab_size=64, d_model=32, num_heads=2, d_ff=64)
    workload = ModelWorkload(config)
    remat = REMATS[cfg["remat"]]
    if remat is not None:
        group = remat["checkpoint_group"] if workload.recurrent else None
        workload = workload.with_remat(Remat(group, block_remat=remat["block_remat"]))
    program = workload.programs(cfg["batch"], cfg["seq"])["train_step"]
    jitted = jax.jit(program.fn, donate_argnums=program.donate_argnums)
    compiled = jitted.lower(*program.args).compile()
    planned = compiled.memory_analysis()
    planned_peak = (
        planned.argument_size_in_bytes
        + planned.output_size_in_bytes
        + planned.temp_size_in_bytes
        - planned.alias_size_in_bytes
    )
    out = dict(cfg, remat_settings=workload.remat.label(), planned_peak_gb=planned_peak / 1e9)
    args = jax.block_until_ready(program.real_args())
    device = jax.devices()[0]
    before = device.memory_stats()
    result = jax.block_until_ready(compiled(*args))
    after = device.memory_stats()
    del result
    if before is None or after is None:
        return dict(out, note="no allocator statistics on this backend")
    peak, steady = int(after["peak_bytes_in_use"]), int(after["bytes_in_use"])
    return dict(
        out,
        state_gb=int(before["bytes_in_use"]) / 1e9,
        peak_gb=peak / 1e9,
        steady_gb=steady / 1e9,
        efficiency=steady / peak if peak else None,
    )


def add_ratios(rows: list[dict]) -> None:
    """`ratio`: a TTT row's peak (measured, else planned) over its attention-only twin's."""
    key = "peak_gb" if any("peak_gb" in r for r in rows) else "planned_peak_gb"
    base = {
        (r["preset"].removesuffix("-attn"), r["seq"], r["batch"], r["remat"]): r.get(key)
        for r in rows
        if r["preset"].endswith("-attn")
    }
    for r in rows:
        if r["preset"].endswith("-attn"):
            continue
        ref = base.get((r["preset"], r["seq"], r["batch"], r["remat"]))
        if ref and r.get(key):
            r["ratio"] = r[key] / ref


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", help="internal: run one JSON config in this process")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check)")
    p.add_argument("--presets", nargs="+", default=["125m"])
    p.add_argument("--seqs", nargs="+", type=int, default=[2048, 8192, 32768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--remat", nargs="+", default=["preset", "block_full"], choices=list(REMATS))
    p.add_argument("--json", help="write all results as JSON here")
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(json.loads(a.one))))
        return
    if a.smoke:
        a.presets, a.seqs = ["tiny"], [128]
    rows = []
    for name in a.presets:
        for t in a.seqs:
            for remat in a.remat:
                for variant in (name, f"{name}-attn"):
                    cfg = dict(preset=variant, seq=t, batch=a.batch, remat=remat, smoke=a.smoke)
                    r = run_in_subprocess(__file__, cfg)
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    add_ratios(rows)
    env = environment()
    command = "python benchmarks/bench_memory_model.py " + " ".join(sys.argv[1:])
    if a.json:
        Path(a.json).write_text(
            json.dumps(dict(environment=env, command=command, results=rows), indent=1)
        )
    print(f"\n{env}\n{command}\n")
    print(
        markdown_table(
            rows,
            [
                ("preset", "model"),
                ("seq", "T"),
                ("batch", "B"),
                ("remat_settings", "remat"),
                ("state_gb", "state GB"),
                ("peak_gb", "peak GB"),
                ("steady_gb", "steady GB"),
                ("efficiency", "steady/peak"),
                ("planned_peak_gb", "planned GB"),
                ("ratio", "TTT/attn"),
                ("error", "error"),
            ],
        )
    )


if __name__ == "__main__":
    main()
