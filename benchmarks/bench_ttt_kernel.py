"""TTT-Linear op speed and memory: our XLA path, our Pallas kernel and fla's `chunk_ttt_linear`,
side by side in one process (issue 16).

Shapes: B in {1, 8}, T in {8192, 32768}, H x D in {12 x 64, 16 x 128}, mini-batch 16; bf16 q, k,
v; fp32 parameters and fast-weight state. Forward and forward+backward (gradients w.r.t. every
input and parameter) times are medians of `--iters` synced calls after warm-up. Memory:
`planned GB` is the compiled program's arguments + outputs + temporaries (JAX,
`memory_analysis()`); for fla the torch allocator's peak during the call (inputs included).

What differs in fla (timed like for like, not equal in meaning): its q is scaled by D^-0.5, its
eta is one per token ([B, T, H, 1], bf16 here) and the update uses the chunk's last eta (ours:
per source token times `token_scale`), its residual `o + GroupNorm(o)` is applied outside its
autograd function (timed here, with it), and K must equal V. Its initial state and bias are
passed (fp32), as ours are; its LayerNorm weight and bias are bf16 (fp32 ones do not compile in
its backward).

    # on the device, with the fla-core 0.6.0 wheel carried as .whl (benchmarks/RESULTS.md)
    PYTHONPATH=/tmp/site:. python3 benchmarks/bench_ttt_kernel.py --out $OUT/ttt_kernel.json
    PYTHONPATH=. python3 benchmarks/bench_ttt_kernel.py --smoke-gpu      # gpu_check.sh
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, markdown_table, time_jitted  # noqa: E402

C = 16
# The goal shapes first (12 x 64 at T=32768), so a time budget cuts the least needed.
SHAPES = [(8, 32768, 12, 64), (1, 32768, 12, 64), (8, 8192, 12, 64), (1, 8192, 12, 64)]
SHAPES += [(8, 32768, 16, 128), (1, 32768, 16, 128), (8, 8192, 16, 128), (1, 8192, 16, 128)]
XLA_GROUP, XLA_UNROLL = 4, 4  # the layer default (benchmarks/RESULTS.md, issue 2)
SWEEP = {64: [(2, 2), (4, 1), (4, 2)], 128: [(4, 2), (8, 2)]}


def jax_inputs(b, t, h, d, seed=0):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q, k, v = (jax.random.normal(ks[i], (b, t, h, d), jnp.bfloat16) for i in range(3))
    params = dict(
        W1=0.02 * jax.random.normal(ks[4], (h, d, d)),
        b1=0.02 * jax.random.normal(ks[5], (h, d)),
        ln_scale=1.0 + 0.1 * jax.random.normal(ks[6], (h, d)),
        ln_bias=0.1 * jax.random.normal(ks[7], (h, d)),
    )
    eta = 0.01 * jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
    return (q, k, v, eta), params


def jax_fns(impl, warps=None, stages=None):
    """`(fwd, fwd_bwd)` jitted functions of `(q, k, v, eta, params)`."""
    import jax
    import jax.numpy as jnp

    from ttt_jax.ops import ttt_linear
    from ttt_jax.ops.ttt.linear_kernel import ttt_linear_pallas

    def forward(q, k, v, eta, p):
        if impl == "xla":
            o, s = ttt_linear(
                q, k, v, eta, **p, mini_batch_size=C, checkpoint_group=XLA_GROUP,
                unroll=XLA_UNROLL,
            )  # fmt: skip
            return o, s.W1, s.b1
        b = q.shape[0]
        w0 = jnp.broadcast_to(p["W1"], (b, *p["W1"].shape))
        b0 = jnp.broadcast_to(p["b1"], (b, *p["b1"].shape))
        ts = 1.0 / jnp.arange(1, C + 1, dtype=jnp.float32)
        return ttt_linear_pallas(
            q, k, v, eta, w0, b0, p["ln_scale"], p["ln_bias"], ts, mini_batch_size=C,
            checkpoint_group=None, interpret=False, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def loss(q, k, v, eta, p):
        o, w, bias = forward(q, k, v, eta, p)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(w) + jnp.sum(bias)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def planned_gb(fn, args) -> float:
    m = fn.lower(*args).compile().memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return total / 1e9


def bench_jax(impl, shape, iters, modes, warps=None, stages=None) -> dict:
    args_x, params = jax_inputs(*shape)
    args = (*args_x, params)
    fwd, fwd_bwd = jax_fns(impl, warps, stages)
    row = dict(impl=impl if impl == "xla" else "kernel", warps=warps, stages=stages)
    for mode, fn in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
        if mode not in modes:
            continue
        t0 = time.perf_counter()
        row[f"{mode}_planned_gb"] = planned_gb(fn, args)
        row[f"{mode}_compile_s"] = time.perf_counter() - t0
        row[f"{mode}_ms"] = time_jitted(fn, *args, warmup=1, iters=iters)["median_ms"]
    return row


def bench_fla(shape, iters, modes) -> dict:
    import torch
    from fla.ops.ttt import chunk_ttt_linear

    b, t, h, d = shape
    dev, bf16 = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*s, dtype=bf16, scale=1.0):
        return (scale * torch.randn(*s, generator=g, device=dev, dtype=torch.float32)).to(dtype)

    q, k, v = (rnd(b, t, h, d) for _ in range(3))
    eta = 0.01 * torch.sigmoid(rnd(b, t, h, 1, dtype=torch.float32)).to(bf16)
    # fla's LayerNorm weight and bias must be in the activations' dtype: with fp32 ones its
    # backward norm kernel does not compile (a loop carry re-assigned fp32 -> bf16, triton 3.6).
    w = (1.0 + rnd(h, d, dtype=torch.float32, scale=0.1)).to(bf16)
    bias = rnd(h, d, scale=0.1)
    h0 = rnd(b, h, d, d, dtype=torch.float32, scale=0.02)
    hb0 = rnd(b, h, 1, d, dtype=torch.float32, scale=0.02)
    leaves = [q, k, v, w, bias, eta, h0, hb0]

    def run(grad: bool):
        for x in leaves:
            x.requires_grad_(grad)
        o, ht, hbt = chunk_ttt_linear(
            q, k, v, w, bias, eta, chunk_size=C, initial_state=h0, initial_state_bias=hb0,
            output_final_state=True,
        )  # fmt: skip
        if grad:
            (o.float().sum() + ht.sum() + hbt.sum()).backward()
            for x in leaves:
                x.grad = None

    row = dict(impl="fla")
    for mode in modes:
        grad = mode == "fwdbwd"
        with torch.set_grad_enabled(grad):
            t0 = time.perf_counter()
            run(grad)  # autotune + compile
            torch.cuda.synchronize()
            row[f"{mode}_compile_s"] = time.perf_counter() - t0
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run(grad)
            torch.cuda.synchronize()
            row[f"{mode}_planned_gb"] = torch.cuda.max_memory_allocated() / 1e9
            row[f"{mode}_input_gb"] = base / 1e9
            times = []
            for _ in range(iters):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run(grad)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row[f"{mode}_ms"] = 1e3 * sorted(times)[len(times) // 2]
    return row


def guarded(fn, base: dict, *a, **kw) -> dict:
    t0 = time.perf_counter()
    try:
        row = fn(*a, **kw)
    except Exception as e:  # out of memory, compile errors: recorded, the run goes on
        traceback.print_exc()
        row = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    row = {**base, **row, "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impls", nargs="+", default=["kernel", "fla", "xla"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"])
    p.add_argument("--shapes", nargs="+", default=None, help="BxTxHxD, e.g. 8x32768x12x64")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="sweep (num_warps, num_stages) first")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip XLA rows after this")
    p.add_argument("--smoke-gpu", action="store_true", help="one small shape, kernel and XLA")
    p.add_argument("--out", help="write all rows as JSON here")
    a = p.parse_args()
    start = time.perf_counter()
    shapes = SHAPES
    if a.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes]
    if a.smoke_gpu:
        shapes, a.impls, a.iters = [(1, 8192, 12, 64)], ["kernel", "xla"], 3

    rows, best = [], {}
    if a.sweep:
        for d in sorted({s[3] for s in shapes}):
            key = max((s for s in shapes if s[3] == d), key=lambda s: s[0] * s[1])
            sweep = []
            for warps, stages in SWEEP[d]:
                base = dict(batch=key[0], seq=key[1], heads=key[2], dim=key[3], sweep=True)
                r = guarded(bench_jax, base, "kernel", key, a.iters, a.modes, warps, stages)
                sweep.append(r)
            rows += sweep
            ok = [r for r in sweep if "error" not in r]
            if ok:
                pick = min(ok, key=lambda r: r.get("fwdbwd_ms", r.get("fwd_ms")))
                best[d] = (pick["warps"], pick["stages"])
    for shape in shapes:
        base = dict(batch=shape[0], seq=shape[1], heads=shape[2], dim=shape[3])
        for impl in a.impls:
            if impl == "kernel":
                warps, stages = best.get(shape[3], (None, None))
                rows.append(
                    guarded(bench_jax, base, "kernel", shape, a.iters, a.modes, warps, stages)
                )
            elif impl == "fla":
                rows.append(guarded(bench_fla, base, shape, a.iters, a.modes))
            elif time.perf_counter() - start < a.budget_s:
                rows.append(guarded(bench_jax, base, "xla", shape, a.iters, a.modes))
            else:
                rows.append({**base, "impl": "xla", "error": "skipped: --budget-s spent"})
    env = environment()
    try:
        import torch

        env["torch"] = torch.__version__
        env["triton"] = __import__("triton").__version__
        env["fla"] = __import__("fla").__version__
    except Exception as e:
        env["torch_side"] = f"unavailable: {e}"
    if a.out:
        Path(a.out).write_text(json.dumps(dict(environment=env, best=best, rows=rows), indent=1))
    print(f"\n{env}\nbest (num_warps, num_stages) per D: {best}\n")
    print(
        markdown_table(
            [r for r in rows if not r.get("sweep")] + [r for r in rows if r.get("sweep")],
            [
                ("batch", "B"),
                ("seq", "T"),
                ("heads", "H"),
                ("dim", "D"),
                ("impl", "impl"),
                ("warps", "warps"),
                ("stages", "stages"),
                ("fwd_ms", "fwd ms"),
                ("fwdbwd_ms", "fwd+bwd ms"),
                ("fwd_planned_gb", "fwd GB"),
                ("fwdbwd_planned_gb", "fwd+bwd GB"),
                ("error", "error"),
            ],
        )
    )


if __name__ == "__main__":
    main()
