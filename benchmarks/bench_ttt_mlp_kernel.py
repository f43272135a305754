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
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kernel_bench as kb  # noqa: E402
from harness import environment, guarded, markdown_table  # noqa: E402

SHAPES = kb.SHAPES_12x64
FIELDS = ("W1", "b1", "W2", "b2")


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


def forward_of(impl, variant=None):
    """`(q, k, v, eta, params) -> (o, W1, b1, W2, b2)` through the XLA op or the kernel."""
    from ttt_jax.ops import ttt_mlp
    from ttt_jax.ops.ttt.mlp_kernel import ttt_mlp_pallas

    if impl == "xla":
        return kb.xla_forward(ttt_mlp, FIELDS)

    def forward(q, k, v, eta, p):
        state, ts = kb.kernel_operands(q, p, FIELDS)
        return ttt_mlp_pallas(
            q, k, v, eta, state, p["ln_scale"], p["ln_bias"], ts, mini_batch_size=kb.C,
            checkpoint_group=variant["group"], interpret=False, fwd=variant["fwd"],
            bwd=variant["bwd"],
        )  # fmt: skip

    return forward


def bench(impl, shape, iters, modes, variant=None) -> dict:
    _, _, h, d = shape
    f = 4 * d
    params = dict(W1=(h, d, f), b1=(h, f), W2=(h, f, d), b2=(h, d), ln_scale=(h, d), ln_bias=(h, d))
    return {"impl": impl, **kb.timed(forward_of(impl, variant), shape, params, iters, modes)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impls", nargs="+", default=["kernel", "xla"], choices=["kernel", "xla"])
    kb.add_shape_args(p)
    p.add_argument("--config", nargs="+", default=["{}"], help="kernel variants (JSON each)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip rows after this")
    p.add_argument("--out", help="append every row here as a JSON line")
    a = p.parse_args()
    start = time.perf_counter()
    shapes = kb.shapes_of(a, SHAPES)
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
            rows.append(guarded(bench, row, *args, out=a.out))
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
