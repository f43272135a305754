"""Speed and memory of the LaCT op (`lact_swiglu`, SPEC 3.2, issue 3) at the 760M layer shape.

H=4 fast-weight heads, D = Dh = 384, chunk C=2048, momentum on, weight norm on, bf16 q/k/v,
fp32 rates, momentum, weights and fast-weight state; T in {8192, 32768}, B in {1, 4}, Muon off
and on (`on`: the op's default update direction, inner gradients and Newton-Schulz with float32
operands; `--muon bf16` adds Muon with `muon_dtype="bfloat16"`, the fast opt-in).
Variants side by side in one run: `custom` (the custom VJP, `backward="custom"`) and autodiff
through the chunk scan with checkpoint groups (`autodiff_g<G>`: `checkpoint_group=G`; plain
`autodiff` has no remat; `custom_g<G>` saves every G-th boundary state).

Measured per config, each in a fresh process (so the allocator peak is that config's own):
forward and forward+backward (gradients w.r.t. q, k, v, the three rates, the momentum and w0,
w1, w2) medians of `--iters` synced calls after warm-up; `peak_bytes_in_use` after the forward
runs and after the forward+backward runs (inputs included); the compiler's planned temporaries.

FLOP count (analytic, "useful" work; what the custom backward recomputes is not counted):
forward = 6 D Dh per token and head for the read plus 12 D Dh per token and head of complete
chunks for the inner gradient (18 D Dh L per head when C divides T, the issue's count), plus,
with Muon, 5 Newton-Schulz steps on the three `[Dh, D]` updates of every chunk, sample and head
at `4 r^2 s + 2 r^3` each (r = min(D, Dh), s = max(D, Dh)); forward+backward = 3 x forward.
TFLOP/s are these counts over the median times, and their fraction of the bf16 matmul peak
measured in the same run (a square `--matmul-n` bf16 matmul, fp32 accumulation).

    PYTHONPATH=. python benchmarks/bench_lact.py --out-dir $OUT/lact             # GPU
    PYTHONPATH=. python benchmarks/bench_lact.py --smoke --out-dir /tmp/lact     # CPU, ~1 min

The full grid is 24 configs (3 variants x 2 T x 2 B x Muon off/on), each compiled in its own
process; where one command has a time limit, split it (`--muon off`, then `--muon on`, each
with its own `--out-dir`). Writes `lact.json` (environment, command, matmul peak, every row)
and `lact.log` (every line printed) under `--out-dir`, and prints the table last. Needs only
jax, flax and numpy.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    environment,
    markdown_table,
    measure_modes,
    ran_as_child,
    run_in_subprocess,
    time_jitted,
)

FULL = dict(heads=4, d=384, dh=384, chunk=2048, seqs=[8192, 32768], batches=[1, 4], matmul_n=8192)
SMOKE = dict(heads=2, d=32, dh=32, chunk=16, seqs=[64], batches=[1], matmul_n=256, iters=2)
DEFAULT_VARIANTS = ["custom", "autodiff_g1", "autodiff_g4"]
NS_STEPS = 5


def parse_variant(name: str) -> tuple[str, int | None]:
    """`custom`, `custom_g4`, `autodiff`, `autodiff_g1` -> (backward, checkpoint_group)."""
    backward, _, group = name.partition("_g")
    if backward not in ("custom", "autodiff") or (group and not group.isdigit()):
        raise ValueError(f"variant {name!r}: custom or autodiff, optionally _g<G>")
    return backward, int(group) if group else None


def forward_flops(b: int, t: int, h: int, d: int, dh: int, c: int, muon: bool) -> float:
    """Analytic forward FLOPs of one call (module docstring)."""
    n = t // c
    flops = b * h * (6 * d * dh * t + 12 * d * dh * n * c)
    if muon:
        r, s = min(d, dh), max(d, dh)
        flops += b * h * n * 3 * NS_STEPS * (4 * r * r * s + 2 * r**3)
    return float(flops)


def measure_matmul_peak(n: int, iters: int) -> dict:
    """bf16 `[n, n] @ [n, n]` with fp32 accumulation: the achievable matmul TFLOP/s."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    timing = time_jitted(fn, a, b, warmup=3, iters=iters)
    return dict(kind="matmul", n=n, **timing, tflops=2 * n**3 / (timing["min_ms"] * 1e-3) / 1e12)


def make_inputs(cfg: dict) -> tuple:
    """q, k, v (bf16, q and k near unit norm as after the layer's L2 norm), softplus rates at
    base 1e-3, sigmoid momentum, and w0 = w2 near 0.5 I (the low-rank init), w1 small."""
    import jax
    import jax.numpy as jnp

    b, t, h, d, dh = cfg["batch"], cfg["seq"], cfg["heads"], cfg["d"], cfg["dh"]
    ks = jax.random.split(jax.random.PRNGKey(0), 10)
    tok = (b, t, h, d)
    q = (jax.random.normal(ks[0], tok) / d**0.5).astype(jnp.bfloat16)
    k = (jax.random.normal(ks[1], tok) / d**0.5).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], tok, jnp.bfloat16)
    rates = tuple(1e-3 * jax.nn.softplus(jax.random.normal(ks[3 + i], (b, t, h))) for i in range(3))
    beta = jax.nn.sigmoid(jax.random.normal(ks[6], (b, t, h)))
    eye = 0.5 * jnp.eye(dh, d)
    w0 = eye + 0.02 * jax.random.normal(ks[7], (h, dh, d))
    w2 = eye + 0.02 * jax.random.normal(ks[8], (h, dh, d))
    w1 = jax.random.normal(ks[9], (h, d, dh)) / dh**0.5
    return (q, k, v, *rates, beta, w0, w1, w2)


def run_one(cfg: dict) -> dict:
    """One config in this process: compile, time forward then forward+backward, read peaks."""
    if cfg.get("kind") == "matmul":
        return measure_matmul_peak(cfg["n"], cfg["iters"])
    import jax
    import jax.numpy as jnp

    from ttt_jax.ops import lact_swiglu

    backward, group = parse_variant(cfg["variant"])

    knobs = dict(
        chunk_size=cfg["chunk"],
        use_muon=cfg["muon"],
        muon_dtype=cfg.get("muon_dtype"),
        checkpoint_group=group,
        backward=backward,
    )

    def forward(q, k, v, lr0, lr1, lr2, beta, w0, w1, w2):
        return lact_swiglu(q, k, v, lr0, lr1, lr2, momentum=beta, w0=w0, w1=w1, w2=w2, **knobs)[0]

    def loss(*args):
        return jnp.sum(forward(*args).astype(jnp.float32))

    args = make_inputs(cfg)
    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    out = {**cfg, **measure_modes(dict(fwd=fwd, fwdbwd=fwd_bwd), args, cfg["iters"])}
    flops = forward_flops(
        cfg["batch"], cfg["seq"], cfg["heads"], cfg["d"], cfg["dh"], cfg["chunk"], cfg["muon"]
    )
    for name, count in (("fwd", flops), ("fwdbwd", 3 * flops)):
        out[f"{name}_tflops"] = count / (out[f"{name}_median_ms"] * 1e-3) / 1e12
    out["fwd_gflop"] = flops / 1e9
    return out


def with_ratios(rows: list[dict], peak_tflops: float | None) -> list[dict]:
    """Adds each row's fraction of the matmul peak, and its time and peak over `custom`'s."""
    row_key = lambda r: (r["batch"], r["seq"], r["muon"], r.get("muon_dtype"))  # noqa: E731
    custom = {row_key(r): r for r in rows if r.get("variant") == "custom" and "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        if peak_tflops:
            for name in ("fwd", "fwdbwd"):
                r[f"{name}_peak_pct"] = 100 * r[f"{name}_tflops"] / peak_tflops
        base = custom.get(row_key(r))
        if base is None:
            continue
        for key in ("fwdbwd_median_ms", "fwdbwd_peak_gb"):
            if r.get(key) is not None and base.get(key):
                r[f"{key}_x_custom"] = r[key] / base[key]
    return rows


COLUMNS = [
    ("batch", "B"),
    ("seq", "T"),
    ("muon", "muon"),
    ("muon_dtype", "update-direction dtype"),
    ("variant", "variant"),
    ("fwd_median_ms", "fwd ms"),
    ("fwdbwd_median_ms", "fwd+bwd ms"),
    ("fwd_peak_gb", "fwd peak GB"),
    ("fwdbwd_peak_gb", "fwd+bwd peak GB"),
    ("fwdbwd_temp_gb", "fwd+bwd planned temp GB"),
    ("fwd_tflops", "fwd TFLOP/s"),
    ("fwdbwd_tflops", "fwd+bwd TFLOP/s"),
    ("fwdbwd_peak_pct", "fwd+bwd % of matmul peak"),
    ("fwdbwd_median_ms_x_custom", "time x custom"),
    ("fwdbwd_peak_gb_x_custom", "peak x custom"),
    ("error", "error"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--one", help="internal: run one JSON config in this process")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--seqs", nargs="+", type=int, help="default 8192 32768")
    p.add_argument("--batches", nargs="+", type=int, help="default 1 4")
    p.add_argument("--muon", nargs="+", default=["off", "on"], choices=["off", "on", "bf16"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--matmul-n", type=int, help="side of the peak matmul (default 8192)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per config")
    p.add_argument("--out-dir", help="write lact.json and lact.log here")
    a = p.parse_args()
    if ran_as_child(a.one, run_one):
        return
    for v in a.variants:
        parse_variant(v)
    shape = dict(SMOKE if a.smoke else FULL)
    seqs, batches = a.seqs or shape["seqs"], a.batches or shape["batches"]
    iters = shape.get("iters", a.iters)
    out_dir = Path(a.out_dir) if a.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "lact.log").write_text("")
    command = "python " + " ".join(shlex.quote(s) for s in sys.argv)

    def log(line: str) -> None:
        print(line, flush=True)
        if out_dir:
            with open(out_dir / "lact.log", "a") as f:
                f.write(line + "\n")

    log(f"`{command}`")
    matmul = run_in_subprocess(
        __file__,
        dict(kind="matmul", n=a.matmul_n or shape["matmul_n"], iters=max(iters, 10)),
        timeout=a.timeout,
    )
    log(json.dumps(matmul))
    rows = []
    for muon in a.muon:
        for b in batches:
            for t in seqs:
                for v in a.variants:
                    cfg = dict(
                        batch=b,
                        seq=t,
                        muon=muon != "off",
                        muon_dtype="bfloat16" if muon == "bf16" else None,
                        variant=v,
                        heads=shape["heads"],
                        d=shape["d"],
                        dh=shape["dh"],
                        chunk=shape["chunk"],
                        iters=iters,
                    )
                    r = run_in_subprocess(__file__, cfg, timeout=a.timeout)
                    log(json.dumps(r))
                    rows.append(r)
    rows = with_ratios(rows, matmul.get("tflops"))
    env = environment()
    if out_dir:
        result = dict(environment=env, command=command, matmul_peak=matmul, results=rows)
        (out_dir / "lact.json").write_text(json.dumps(result, indent=1))
    tflops = matmul.get("tflops")
    peak = "failed: " + matmul.get("error", "") if tflops is None else f"{tflops:.1f} TFLOP/s"
    log(f"\n{env}\nbf16 matmul peak ({matmul.get('n')}^3): {peak}")
    log(f"shape: H={shape['heads']}, D={shape['d']}, Dh={shape['dh']}, C={shape['chunk']}\n")
    log(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
