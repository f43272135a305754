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
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kernel_bench as kb  # noqa: E402
from harness import environment, guarded, markdown_table  # noqa: E402

SHAPES = kb.SHAPES_12x64 + [(b, t, 16, 128) for t in (32768, 8192) for b in (8, 1)]
SWEEP = {64: [(2, 2), (4, 1), (4, 2)], 128: [(4, 2), (8, 2)]}


def forward_of(impl, warps=None, stages=None):
    """`(q, k, v, eta, params) -> (o, W, b)` through the XLA op or the kernel."""
    from ttt_jax.ops import ttt_linear
    from ttt_jax.ops.ttt.linear_kernel import ttt_linear_pallas

    if impl == "xla":
        return kb.xla_forward(ttt_linear, ("W1", "b1"))

    def forward(q, k, v, eta, p):
        (w0, b0), ts = kb.kernel_operands(q, p, ("W1", "b1"))
        return ttt_linear_pallas(
            q, k, v, eta, w0, b0, p["ln_scale"], p["ln_bias"], ts, mini_batch_size=kb.C,
            checkpoint_group=None, interpret=False, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    return forward


def bench_jax(impl, shape, iters, modes, warps=None, stages=None) -> dict:
    _, _, h, d = shape
    params = dict(W1=(h, d, d), b1=(h, d), ln_scale=(h, d), ln_bias=(h, d))
    row = dict(impl=impl if impl == "xla" else "kernel", warps=warps, stages=stages)
    return {**row, **kb.timed(forward_of(impl, warps, stages), shape, params, iters, modes)}


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
            q, k, v, w, bias, eta, chunk_size=kb.C, initial_state=h0, initial_state_bias=hb0,
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impls", nargs="+", default=["kernel", "fla", "xla"])
    kb.add_shape_args(p)
    p.add_argument("--sweep", action="store_true", help="sweep (num_warps, num_stages) first")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip XLA rows after this")
    p.add_argument("--smoke-gpu", action="store_true", help="one small shape, kernel and XLA")
    p.add_argument("--out", help="write all rows as JSON here")
    a = p.parse_args()
    start = time.perf_counter()
    shapes = kb.shapes_of(a, SHAPES)
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
