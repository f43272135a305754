"""TTT-MLP op speed and memory: the Pallas kernel (`ttt_jax/ops/ttt/mlp_kernel.py`) and the XLA
path side by side in one process (issue 17).

Shapes: B in {1, 8}, T in {8192, 32768}, 12 heads x 64 (hidden 256), mini-batch 16; bf16 q, k,
v; fp32 parameters and fast-weight state. Forward and forward+backward (gradients w.r.t. every
input and parameter) times are medians of `--iters` synced calls after warm-up. Memory:
`planned GB` is the compiled program's arguments + outputs + temporaries (`memory_analysis()`).
The XLA path runs at the layer default (`checkpoint_group=4, unroll=4`).

Kernel layouts to try go in `--config`, one JSON object per variant with optional "fwd" and
"bwd" `Launch` fields (num_warps, num_stages, hidden_block, state_in) and "group" (the
checkpoint spacing); the first variant is the one timed against XLA at every shape, all of them
at the first shape. Every row is printed as one JSON line (and appended to `--out`).

    # on the device (one call); the first variant is the default launch
    PYTHONPATH=. python3 benchmarks/bench_ttt_mlp_kernel.py --budget-s 400 --out $OUT/mlp.jsonl \
      --config '{}' '{"fwd": {"state_in": "hbm", "hidden_block": 64}}' \
      '{"fwd": {"num_warps": 16}, "bwd": {"num_warps": 16}}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, markdown_table, time_jitted  # noqa: E402

C = 16
# The goal shapes first, so a time budget cuts the least needed.
SHAPES = [(8, 32768, 12, 64), (1, 32768, 12, 64), (8, 8192, 12, 64), (1, 8192, 12, 64)]
XLA_GROUP, XLA_UNROLL = 4, 4  # the layer default


def jax_inputs(b, t, h, d, seed=0):
    import jax
    import jax.numpy as jnp

    f = 4 * d
    ks = jax.random.split(jax.random.PRNGKey(seed), 10)
    q, k, v = (jax.random.normal(ks[i], (b, t, h, d), jnp.bfloat16) for i in range(3))
    params = dict(
        W1=0.02 * jax.random.normal(ks[4], (h, d, f)),
        b1=0.02 * jax.random.normal(ks[5], (h, f)),
        W2=0.02 * jax.random.normal(ks[6], (h, f, d)),
        b2=0.02 * jax.random.normal(ks[7], (h, d)),
        ln_scale=1.0 + 0.1 * jax.random.normal(ks[8], (h, d)),
        ln_bias=0.1 * jax.random.normal(ks[9], (h, d)),
    )
    eta = 0.01 * jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
    return (q, k, v, eta), params


def parse_config(text: str) -> dict:
    """`{"fwd": {...}, "bwd": {...}, "group": G}` -> `Launch`es and the group (ValueError on
    unknown keys, from `Launch` itself)."""
    from ttt_jax.ops.ttt.mlp_kernel import Launch

    raw = json.loads(text)
    unknown = set(raw) - {"fwd", "bwd", "group"}
    if unknown:
        raise ValueError(f"--config keys {sorted(unknown)} are not among fwd, bwd, group")
    return dict(
        fwd=Launch(**raw["fwd"]) if "fwd" in raw else None,
        bwd=Launch(**raw["bwd"]) if "bwd" in raw else None,
        group=raw.get("group"),
    )


def jax_fns(impl, variant=None):
    """`(fwd, fwd_bwd)` jitted functions of `(q, k, v, eta, params)`."""
    import jax
    import jax.numpy as jnp

    from ttt_jax.ops import ttt_mlp
    from ttt_jax.ops.ttt.mlp_kernel import ttt_mlp_pallas

    def forward(q, k, v, eta, p):
        if impl == "xla":
            o, s = ttt_mlp(
                q, k, v, eta, **p, mini_batch_size=C, checkpoint_group=XLA_GROUP,
                unroll=XLA_UNROLL,
            )  # fmt: skip
            return o, s.W1, s.b1, s.W2, s.b2
        b = q.shape[0]
        state = tuple(jnp.broadcast_to(p[n], (b, *p[n].shape)) for n in ("W1", "b1", "W2", "b2"))
        ts = 1.0 / jnp.arange(1, C + 1, dtype=jnp.float32)
        return ttt_mlp_pallas(
            q, k, v, eta, state, p["ln_scale"], p["ln_bias"], ts, mini_batch_size=C,
            checkpoint_group=variant["group"], interpret=False, fwd=variant["fwd"],
            bwd=variant["bwd"],
        )  # fmt: skip

    def loss(q, k, v, eta, p):
        o, *s = forward(q, k, v, eta, p)
        return jnp.sum(o.astype(jnp.float32)) + sum(jnp.sum(x) for x in s)

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


def bench(impl, shape, iters, modes, variant=None) -> dict:
    args_x, params = jax_inputs(*shape)
    args = (*args_x, params)
    fwd, fwd_bwd = jax_fns(impl, variant)
    row = dict(impl=impl)
    for mode, fn in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
        if mode not in modes:
            continue
        t0 = time.perf_counter()
        row[f"{mode}_planned_gb"] = planned_gb(fn, args)
        row[f"{mode}_compile_s"] = time.perf_counter() - t0
        row[f"{mode}_ms"] = time_jitted(fn, *args, warmup=1, iters=iters)["median_ms"]
    return row


def guarded(fn, base: dict, out: str | None, *a, **kw) -> dict:
    t0 = time.perf_counter()
    try:
        row = fn(*a, **kw)
    except Exception as e:  # out of memory, compile errors: recorded, the run goes on
        traceback.print_exc()
        row = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    row = {**base, **row, "wall_s": round(time.perf_counter() - t0, 1)}
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impls", nargs="+", default=["kernel", "xla"], choices=["kernel", "xla"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"])
    p.add_argument("--shapes", nargs="+", default=None, help="BxTxHxD, e.g. 8x32768x12x64")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--config", nargs="+", default=["{}"], help="kernel variants (JSON each)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip rows after this")
    p.add_argument("--out", help="append every row here as a JSON line")
    a = p.parse_args()
    start = time.perf_counter()
    shapes = SHAPES
    if a.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes]
    variants = [(text, parse_config(text)) for text in a.config]
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps(dict(environment=environment())) + "\n")

    rows = []
    for si, shape in enumerate(shapes):
        base = dict(batch=shape[0], seq=shape[1], heads=shape[2], dim=shape[3])
        jobs = [("kernel", v) for v in (variants if si == 0 else variants[:1])]
        jobs = [j for j in jobs if "kernel" in a.impls] + [("xla", None)] * ("xla" in a.impls)
        for impl, variant in jobs:
            row = {**base, "config": variant[0] if variant else None}
            if time.perf_counter() - start > a.budget_s:
                rows.append({**row, "impl": impl, "error": "skipped: --budget-s spent"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            args = (impl, shape, a.iters, a.modes, variant[1] if variant else None)
            rows.append(guarded(bench, row, a.out, *args))
    print(f"\n{environment()}\n")
    print(
        markdown_table(
            rows,
            [
                ("batch", "B"),
                ("seq", "T"),
                ("impl", "impl"),
                ("config", "config"),
                ("fwd_ms", "fwd ms"),
                ("fwdbwd_ms", "fwd+bwd ms"),
                ("fwd_planned_gb", "fwd GB"),
                ("fwdbwd_planned_gb", "fwd+bwd GB"),
                ("fwdbwd_compile_s", "compile s"),
                ("error", "error"),
            ],
        )
    )


if __name__ == "__main__":
    main()
