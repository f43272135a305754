"""Training memory measured on the device against the compiler's plan and the planner's choice
(issue 6): the memory headline, the layer reports, and a planner check, from one run.

1. Headline: the LM with TTT-Linear in every other block against the attention-only model,
   one training step (forward, backward, AdamW update; parameters and optimizer state donated)
   at bf16 compute. Users saw 2.24x (44.2 vs 19.7 GB); the target is at most 1.15x.
2. Layers: loss + gradients of single layers (`ttt_jax.memory.LayerSpec`).
3. Planner: `ttt_jax.memory.plan` picks remat settings and the longest sequence for
   `--plan-budget` on this device; that config is then run and its measured peak compared
   with the budget.

Every row runs in a fresh process (the allocator's peak counter cannot be reset), with
`XLA_PYTHON_CLIENT_PREALLOCATE=false`. From the allocator: `bytes_in_use` before the step
(`state`: parameters, optimizer state, inputs), `peak_bytes_in_use` before it (`pre-step
peak`: the compile's autotuning buffers and the parameter init also count) and after it
(`peak`: the step's own where it is above the pre-step peak, `step_sets_peak`), `bytes_in_use`
after it (`steady`), `efficiency = steady / peak`. Beside them the compiler's
planned peak of the same program (argument + output + temp - alias, `memory_analysis()`) and
`measured / planned`. `TTT/attn` is a TTT row's peak over the attention-only row with the same
shape and remat settings (measured where the backend keeps statistics, else planned).

    PYTHONPATH=. python benchmarks/bench_memory_model.py --out $OUT/memory   # GPU
    PYTHONPATH=. python benchmarks/bench_memory_model.py --smoke --out /tmp/m  # CPU

On an H100 the defaults take about 7.5 minutes: 6 model rows (125m at T=8192, ~3.3 min), 2
layer rows (~1 min), the planner check (8 compiles of ~20 s, ~3.3 min; `--plan-budget ''`
skips it). The smoke run takes 3-6 minutes on 2 busy CPU cores, ~3 minutes on the H100.

Writes `memory_model.json` (environment, command, rows) and `memory_model.log` (everything
printed) under `--out`, and prints the table last. Needs only jax, flax, optax, numpy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, markdown_table, ran_as_child, run_in_subprocess  # noqa: E402

REMATS = {
    "preset": None,
    "block_full": dict(checkpoint_group=4, block_remat="full"),
    "block_dots": dict(checkpoint_group=4, block_remat="dots_no_batch"),
}
# Smoke shapes: every path of the GPU run, compiled in seconds on a CPU.
SMOKE_MODEL = dict(vocab_size=64, d_model=32, num_heads=2, d_ff=64)
SMOKE_MINI_BATCH = 4
SMOKE_LAYER = dict(d_model=32, heads=2, chunk=64, d_ff=64)
GB = 1e9


def model_workload(cfg: dict):
    from ttt_jax.memory import ModelWorkload, Remat
    from ttt_jax.models import preset

    config = dataclasses.replace(preset(cfg["preset"]), precision="bf16")
    if cfg["smoke"]:
        ttt = dataclasses.replace(config.ttt, mini_batch_size=SMOKE_MINI_BATCH)
        config = dataclasses.replace(config, ttt=ttt, **SMOKE_MODEL)
    workload = ModelWorkload(config)
    remat = REMATS[cfg["remat"]]
    if remat is not None:
        group = remat["checkpoint_group"] if workload.recurrent else None
        workload = workload.with_remat(Remat(group, block_remat=remat["block_remat"]))
    return workload


def layer_workload(cfg: dict):
    from ttt_jax.memory import LayerSpec

    shape = SMOKE_LAYER if cfg["smoke"] else {}
    spec = LayerSpec(layer=cfg["layer"], seq=cfg["seq"], batch=cfg["batch"], **shape)
    return spec.workload()


def measure(workload, program_name: str, batch: int, seq: int) -> dict:
    """Compiles the program, runs it once on real arrays, and reads compiler and allocator."""
    import jax

    from ttt_jax.memory.analysis import CompiledMemory, compile_lowered, run_measured

    program = workload.programs(batch, seq)[program_name]
    t0 = time.perf_counter()
    jitted = jax.jit(program.fn, donate_argnums=program.donate_argnums)
    # The fast CPU options change nothing but compile time (tests/memory/test_memory_report.py).
    compiled = compile_lowered(jitted.lower(*program.args))
    planned = CompiledMemory.of(compiled)
    out = dict(
        title=workload.describe(),
        remat_settings=workload.remat.label(block=program_name == "train_step"),
        program=program_name,
        compile_s=time.perf_counter() - t0,
        planned_peak_gb=planned.peak / GB,
        planned_temp_gb=planned.temp / GB,
    )
    args = jax.block_until_ready(program.real_args())
    memory, result = run_measured(compiled, *args)
    del result
    if memory is None:
        return dict(out, note="no allocator statistics on this backend")
    # The peak counter also saw the compile (the autotuner's buffers) and the parameter init:
    # only where the step raised it is `peak` the step's own (`step_sets_peak`).
    return dict(
        out,
        state_gb=memory.pre_steady / GB,
        pre_step_peak_gb=memory.pre_peak / GB,
        step_sets_peak=memory.run_sets_peak,
        peak_gb=memory.peak / GB,
        steady_gb=memory.steady / GB,
        efficiency=memory.efficiency,
        measured_over_planned=memory.peak / planned.peak if memory.run_sets_peak else None,
        bytes_limit_gb=memory.bytes_limit / GB if memory.bytes_limit else None,
    )


def run_plan(cfg: dict) -> dict:
    """Plans on this device (abstract compiles only), then runs the chosen config."""
    from ttt_jax.memory import parse_bytes, plan

    if cfg["target"].startswith("layer:"):
        workload = layer_workload(dict(cfg, layer=cfg["target"][6:], seq=1))
    else:
        workload = model_workload(dict(cfg, preset=cfg["target"][6:], remat="preset"))
    budget = parse_bytes(cfg["budget"])
    t0 = time.perf_counter()
    p = plan(workload, budget, batch=cfg["batch"], max_seq=cfg["max_seq"])
    planned = dict(
        plan_s=time.perf_counter() - t0,
        plan_compiles=len(p.trials),
        budget_gb=budget / GB,
        seq=p.seq,
        plan_peak_gb=p.peak / GB,
    )
    row = measure(p.workload, p.workload.fit_program, p.batch, p.seq)
    if "peak_gb" in row:
        row["fits_measured"] = row["peak_gb"] <= budget / GB
    return dict(cfg, **planned, **row)


def run_one(cfg: dict) -> dict:
    if cfg["kind"] == "model":
        return dict(cfg, **measure(model_workload(cfg), "train_step", cfg["batch"], cfg["seq"]))
    if cfg["kind"] == "layer":
        return dict(cfg, **measure(layer_workload(cfg), "fwd_bwd", cfg["batch"], cfg["seq"]))
    return run_plan(cfg)


def add_ratios(rows: list[dict]) -> None:
    """`ratio`: a TTT model row's peak (measured, else planned) over its attention-only twin's."""
    models = [r for r in rows if r.get("kind") == "model"]
    key = "peak_gb" if any("peak_gb" in r for r in models) else "planned_peak_gb"
    base = {
        (r["preset"].removesuffix("-attn"), r["seq"], r["batch"], r["remat"]): r.get(key)
        for r in models
        if r["preset"].endswith("-attn")
    }
    for r in models:
        if not r["preset"].endswith("-attn"):
            ref = base.get((r["preset"], r["seq"], r["batch"], r["remat"]))
            if ref and r.get(key):
                r["ratio"] = r[key] / ref


def row_name(r: dict) -> str:
    if r["kind"] == "model":
        return f"{r['preset']} ({r['remat']})"
    if r["kind"] == "layer":
        return r["layer"]
    return f"plan {r['target']} in {r['budget']}"


COLUMNS = [
    ("name", "what"),
    ("seq", "T"),
    ("batch", "B"),
    ("remat_settings", "remat"),
    ("state_gb", "state GB"),
    ("pre_step_peak_gb", "pre-step peak GB"),
    ("peak_gb", "peak GB"),
    ("steady_gb", "steady GB"),
    ("efficiency", "steady/peak"),
    ("planned_peak_gb", "planned GB"),
    ("measured_over_planned", "meas/plan"),
    ("ratio", "TTT/attn"),
    ("fits_measured", "fits budget"),
    ("compile_s", "compile s"),
    ("error", "error"),
]


def configs(a: argparse.Namespace) -> list[dict]:
    common = dict(batch=a.batch, smoke=a.smoke)
    out = []
    for name in a.presets:
        for t in a.seqs:
            for remat in a.remat:
                for variant in (name, f"{name}-attn"):
                    out.append(dict(common, kind="model", preset=variant, seq=t, remat=remat))
    for layer in a.layers:
        out.append(dict(common, kind="layer", layer=layer, seq=a.layer_seq))
    if a.plan_budget:
        out.append(
            dict(
                common,
                kind="plan",
                target=a.plan_target,
                budget=a.plan_budget,
                max_seq=a.plan_max_seq,
            )
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", help="internal: run one JSON config in this process")
    p.add_argument("--out", help="directory for memory_model.json and memory_model.log")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check of every path)")
    p.add_argument("--presets", nargs="+", default=["125m"])
    p.add_argument("--seqs", nargs="+", type=int, default=[8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--remat", nargs="+", default=list(REMATS), choices=list(REMATS))
    p.add_argument("--layers", nargs="*", default=["ttt_linear", "lact"])
    p.add_argument("--layer-seq", type=int, default=8192)
    p.add_argument("--plan-budget", default="1GiB", help="planner check budget ('' to skip)")
    # A layer by default: a 125m model compiles in ~30 s on an H100 and a plan takes 6-8.
    p.add_argument(
        "--plan-target", default="layer:ttt_linear", help="model:PRESET or layer:LAYER to plan"
    )
    p.add_argument("--plan-max-seq", type=int, default=2**16)
    p.add_argument("--timeout", type=float, default=600, help="seconds per row")
    a = p.parse_args()
    if ran_as_child(a.one, run_one):
        return
    if a.smoke:
        a.presets, a.seqs, a.layer_seq = ["tiny"], [128], 256
        a.plan_target, a.plan_max_seq = "model:tiny", 4096
        a.plan_budget = a.plan_budget and "64MiB"
    out_dir = Path(a.out) if a.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)
        if out_dir:
            (out_dir / "memory_model.log").write_text("\n".join(log_lines) + "\n")

    env = environment()
    command = "PYTHONPATH=. python benchmarks/bench_memory_model.py " + " ".join(sys.argv[1:])
    log(json.dumps(env))
    log(command)
    rows = []
    for cfg in configs(a):
        t0 = time.perf_counter()
        r = run_in_subprocess(__file__, cfg, timeout=a.timeout)
        r.update(name=row_name(r), wall_s=time.perf_counter() - t0)
        log(json.dumps(r))
        rows.append(r)
    add_ratios(rows)
    if out_dir:
        result = dict(environment=env, command=command, results=rows)
        (out_dir / "memory_model.json").write_text(json.dumps(result, indent=1))
    log("")
    log(" | ".join([env["device"], env["backend"], f"jax {env['jax']}", env["date"]]))
    log(command)
    log(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
