"""Speed and memory of the NPT MLP (SPEC 3.4) against the same MLP without modulation.

Forward+backward (gradients of all parameters and both inputs) of `NPTMLP` at B=4, d=4096,
F=11008, r=16, S in {512, 4096}, compute bf16 with fp32 params (`MixedPrecision.named("bf16")`).
Goal: the modulated MLP within 1.15x of the plain MLP's time and 1.1x of its peak memory.

Each (S, variant) runs in a fresh subprocess so that `peak_bytes_in_use` is that config's own
peak (parameters, gradients and inputs included). Time is the median of `--iters` jitted steps
after `--warmup` steps, each ended with `block_until_ready`.

    python benchmarks/bench_npt.py --out benchmarks/results/npt_h100.json    # GPU, a few minutes
    python benchmarks/bench_npt.py --smoke                                   # CPU, tiny, ~30 s
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

FULL = dict(batch=4, seqs=(512, 4096), d_model=4096, d_ff=11008, rank=16)
SMOKE = dict(batch=2, seqs=(16, 32), d_model=64, d_ff=128, rank=4)
# variant -> (modulation, rank_k_form)
VARIANTS = {
    "none": ("none", "factored"),
    "low_rank": ("low_rank", "factored"),
    "rank_k": ("rank_k", "factored"),
    "rank_k_vectors": ("rank_k", "vectors"),
}


def run_one(args: argparse.Namespace) -> dict:
    """One config in this process: compile, warm up, time, read the peak."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ttt_jax.layers.common import MixedPrecision
    from ttt_jax.layers.npt_mlp import NPTMLP, NPTMLPConfig

    precision = MixedPrecision.named(args.precision)
    cfg = NPTMLPConfig(
        d_model=args.d_model,
        d_ff=args.d_ff,
        rank=args.rank,
        modulation=VARIANTS[args.variant][0],
        rank_k_form=VARIANTS[args.variant][1],
        k=args.k,
        precision=precision,
    )
    model = NPTMLP(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    cd = precision.compute_dtype
    kx, ka = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (args.batch, args.seq, args.d_model), cd)
    a = jax.random.normal(ka, (args.batch, args.seq, args.d_model), cd)

    @jax.jit
    def fwd_bwd(state, x, a):
        def loss(state, x, a):
            y, aux = nnx.merge(graphdef, state)(x, a)
            return jnp.mean(jnp.square(y.astype(jnp.float32))) + aux

        return jax.value_and_grad(loss, (0, 1, 2))(state, x, a)

    compiled = fwd_bwd.lower(state, x, a).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    for _ in range(args.warmup):
        jax.block_until_ready(fwd_bwd(state, x, a))
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd_bwd(state, x, a))
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        seq=args.seq,
        variant=args.variant,
        median_ms=1e3 * statistics.median(times),
        min_ms=1e3 * min(times),
        peak_bytes=stats.get("peak_bytes_in_use"),
        temp_bytes=temp,
        env=environment(),
    )


def child_command(args: argparse.Namespace, seq: int, variant: str, shape: dict) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--seq",
        str(seq),
        "--variant",
        variant,
        "--batch",
        str(shape["batch"]),
        "--d-model",
        str(shape["d_model"]),
        "--d-ff",
        str(shape["d_ff"]),
        "--rank",
        str(shape["rank"]),
        "--k",
        str(args.k),
        "--precision",
        args.precision,
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
    ]


def environment() -> dict:
    """Device and versions, read in a child: the parent never initialises a backend, so it
    holds no device memory while the children run."""
    import flax
    import jax

    return dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        device=str(jax.devices()[0].device_kind),
        backend=jax.default_backend(),
        jax=jax.__version__,
        jaxlib=importlib.metadata.version("jaxlib"),
        flax=flax.__version__,
        python=platform.python_version(),
    )


def ratio(value, base):
    return None if value is None or not base else value / base


def ms(value):
    return "failed" if value is None else f"{value:.2f}"


def mb(value):
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| S | variant | fwd+bwd ms (median) | time vs plain | peak MiB | peak vs plain "
        "| compiled temp MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, p = r["time_ratio"], r["peak_ratio"]
        lines.append(
            f"| {r['seq']} | {r['variant']} | {ms(r['median_ms'])} | "
            f"{'n/a' if t is None else f'{t:.3f}x'} | {mb(r['peak_bytes'])} | "
            f"{'n/a' if p is None else f'{p:.3f}x'} | {mb(r['temp_bytes'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["none", "low_rank"],
        choices=list(VARIANTS),
        help="'none' is the plain MLP baseline and is always run",
    )
    parser.add_argument("--seqs", nargs="+", type=int, help="override the sequence lengths")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--k", type=int, default=1, help="vector pairs of the rank_k variant")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    # internal: one config per subprocess
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--d-model", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--d-ff", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    shape = dict(SMOKE if args.smoke else FULL)
    if args.smoke:
        args.iters, args.warmup = min(args.iters, 3), min(args.warmup, 1)
    seqs = args.seqs or shape["seqs"]
    variants = ["none"] + [v for v in args.variants if v != "none"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    )
    rows, envs = [], []
    for seq in seqs:
        base = None
        for variant in variants:
            proc = subprocess.run(
                child_command(args, seq, variant, shape), env=env, capture_output=True, text=True
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                tail = (proc.stderr or proc.stdout)[-3000:]
                row = dict(
                    seq=seq,
                    variant=variant,
                    median_ms=None,
                    min_ms=None,
                    peak_bytes=None,
                    temp_bytes=None,
                    error=tail,
                )
                print(f"S={seq} {variant} failed:\n{tail}", file=sys.stderr)
            else:
                row = json.loads(lines[-1][len("RESULT ") :])
                envs.append(row.pop("env"))
            if variant == "none":
                base = row
            row["time_ratio"] = ratio(row["median_ms"], base and base["median_ms"])
            row["peak_ratio"] = ratio(row["peak_bytes"], base and base["peak_bytes"])
            rows.append(row)
            print(f"S={seq} {variant}: {ms(row['median_ms'])} ms", file=sys.stderr)

    result = dict(
        envs[0] if envs else {},
        command=" ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        shape={k: v for k, v in shape.items() if k != "seqs"},
        seqs=seqs,
        precision=args.precision,
        k=args.k,
        iters=args.iters,
        warmup=args.warmup,
        goal=dict(time_ratio=1.15, peak_ratio=1.1),
        rows=rows,
    )
    print(
        f"NPT MLP fwd+bwd, {result.get('device')} ({result.get('backend')}), "
        f"jax {result.get('jax')}, flax {result.get('flax')}, {result.get('date')}, "
        f"precision {args.precision}, shape {result['shape']}\n"
    )
    print(table(rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
