"""Speed and memory of TTT-Linear / TTT-MLP at the 125M shape (hidden 768, 12 heads x 64, C=16).

Inner op (`ttt_linear` / `ttt_mlp`, dual form) in several memory/speed settings, side by side
with the autodiff-through-the-primal-form baseline (`ttt_linear_primal`) in the same run, and
the full NNX layer. bf16 q/k/v, fp32 eta, parameters and fast-weight state. Forward and
forward+backward (gradients w.r.t. q, k, v, eta and the initial weights) times are medians of
`--iters` synced calls after warm-up; memory is the config's own allocator peak
(`peak_bytes_in_use`, one fresh process per config) and the compiler's planned peak.

    PYTHONPATH=. python benchmarks/bench_ttt.py --out $OUT/ttt.json        # GPU
    PYTHONPATH=. python benchmarks/bench_ttt.py --smoke                      # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    environment,
    markdown_table,
    peak_bytes,
    planned_gb,
    ran_as_child,
    run_in_subprocess,
    time_jitted,
)

H, D, C = 12, 64, 16
# XLA flags of the `_cb` variants: run the scan's while loop as a CUDA-graph command buffer
# (no host round trip per iteration).
COMMAND_BUFFER_FLAGS = "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
DEFAULT_VARIANTS = ["dual", "dual_g4", "dual_u4", "dual_g8_u4", "primal_g4", "layer", "layer_g4"]


def parse_variant(name: str) -> tuple[str, str, int | None, int, bool]:
    """`dual`, `dual_g8_u8`, `primal_g4`, `layer_g4_u4_cb` -> (kind, impl, group, unroll, cb).

    `g<G>`: checkpoint_group G; `u<U>`: scan unroll U; `cb`: command-buffer XLA flags.
    """
    head, *parts = name.split("_")
    if head not in ("dual", "primal", "layer"):
        raise ValueError(f"variant {name!r}: must start with dual, primal or layer")
    group, unroll, cb = None, 1, False
    for part in parts:
        if part == "cb":
            cb = True
        elif part[:1] in ("g", "u") and part[1:].isdigit():
            group, unroll = (int(part[1:]), unroll) if part[0] == "g" else (group, int(part[1:]))
        else:
            raise ValueError(f"variant {name!r}: unknown part {part!r} (g<N>, u<N> or cb)")
    kind, impl = ("layer", "dual") if head == "layer" else ("op", head)
    return kind, impl, group, unroll, cb


def run_one(cfg: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ttt_jax.layers import BF16, TTTConfig, TTTLayer
    from ttt_jax.ops import ttt_linear, ttt_linear_primal, ttt_mlp, ttt_mlp_primal

    kind, impl, group, unroll, _ = parse_variant(cfg["variant"])
    b, t, inner = cfg["batch"], cfg["seq"], cfg["inner"]
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    if kind == "op":
        x = [jax.random.normal(keys[i], (b, t, H, D), jnp.bfloat16) for i in range(3)]
        eta = 0.01 * jax.nn.sigmoid(jax.random.normal(keys[3], (b, t, H)))
        f = 4 * D
        w = {
            "W1": 0.02 * jax.random.normal(keys[4], (H, D, D if inner == "linear" else f)),
            "b1": jnp.zeros((H, D if inner == "linear" else f)),
        }
        if inner == "mlp":
            w |= {"W2": 0.02 * jax.random.normal(keys[5], (H, f, D)), "b2": jnp.zeros((H, D))}
        ln = {"ln_scale": jnp.ones((H, D)), "ln_bias": jnp.zeros((H, D))}
        op = {
            ("linear", "dual"): ttt_linear,
            ("linear", "primal"): ttt_linear_primal,
            ("mlp", "dual"): ttt_mlp,
            ("mlp", "primal"): ttt_mlp_primal,
        }[(inner, impl)]

        def forward(q, k, v, eta, w):
            return op(
                q, k, v, eta, **w, **ln, mini_batch_size=C, checkpoint_group=group, unroll=unroll
            )[0]

        args = (*x, eta, w)
    else:
        layer = TTTLayer(
            TTTConfig(
                d_model=H * D,
                num_heads=H,
                inner=inner,
                mini_batch_size=C,
                checkpoint_group=group,
                unroll=unroll,
                precision=BF16,
            ),
            rngs=nnx.Rngs(0),
        )
        graphdef, params = nnx.split(layer, nnx.Param)

        def forward(params, x):
            return nnx.merge(graphdef, params)(x)

        args = (params, jax.random.normal(keys[0], (b, t, H * D), jnp.bfloat16))

    def loss(*a):
        return jnp.sum(forward(*a).astype(jnp.float32))

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    out = dict(cfg)
    out["planned_peak_gb"] = planned_gb(fwd_bwd, *args)
    out.update({f"fwd_{k}": v for k, v in time_jitted(fwd, *args, iters=cfg["iters"]).items()})
    out.update(
        {f"fwdbwd_{k}": v for k, v in time_jitted(fwd_bwd, *args, iters=cfg["iters"]).items()}
    )
    pb = peak_bytes()
    out["peak_gb"] = None if pb is None else pb / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", help="internal: run one JSON config in this process")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check)")
    p.add_argument("--inner", nargs="+", default=["linear", "mlp"])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--seqs", nargs="+", type=int, default=[2048, 8192, 32768])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", help="write all results as JSON here")
    a = p.parse_args()
    if ran_as_child(a.one, run_one):
        return
    if a.smoke:
        a.batches, a.seqs, a.iters = [1], [64], 2
    rows = []
    for inner in a.inner:
        for b in a.batches:
            for t in a.seqs:
                for v in a.variants:
                    cfg = dict(inner=inner, batch=b, seq=t, variant=v, iters=a.iters)
                    flags = COMMAND_BUFFER_FLAGS if parse_variant(v)[4] else None
                    r = run_in_subprocess(__file__, cfg, xla_flags=flags)
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    env = environment()
    if a.out:
        Path(a.out).write_text(json.dumps(dict(environment=env, results=rows), indent=1))
    print(f"\n{env}\n")
    print(
        markdown_table(
            rows,
            [
                ("inner", "inner"),
                ("batch", "B"),
                ("seq", "T"),
                ("variant", "variant"),
                ("fwd_median_ms", "fwd ms"),
                ("fwdbwd_median_ms", "fwd+bwd ms"),
                ("peak_gb", "peak GB"),
                ("planned_peak_gb", "planned GB"),
                ("error", "error"),
            ],
        )
    )


if __name__ == "__main__":
    main()
