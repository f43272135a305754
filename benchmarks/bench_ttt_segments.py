"""Speed of TTT-Linear / TTT-MLP with packed documents (`segment_ids`) against the unsegmented
path, side by side in one run (125M head shape: 12 heads x 64, C=16; bf16 q/k/v, fp32 eta and
state; checkpoint_group=4, unroll=4 as the layer's defaults).

Layouts: `none` (segment_ids=None, the baseline), `one` (one document: the segmented path on
the same math), `long` (documents of 2048 tokens), `mixed` (random lengths, mean ~512, one in
eight shorter than C). Forward+backward (gradients w.r.t. q, k, v, eta, W1, b1) medians of
`--iters` synced calls.

    PYTHONPATH=. python benchmarks/bench_ttt_segments.py --out $OUT/ttt_segments.json   # GPU
    PYTHONPATH=. python benchmarks/bench_ttt_segments.py --smoke                          # CPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, markdown_table, time_jitted  # noqa: E402

H, D, C = 12, 64, 16
LAYOUTS = ("none", "one", "long", "mixed")


def segment_ids(layout: str, b: int, t: int, seed: int = 0):
    import numpy as np

    if layout == "none":
        return None
    if layout == "one":
        return np.zeros((b, t), np.int32)
    if layout == "long":
        return np.broadcast_to(np.arange(t) // 2048, (b, t)).astype(np.int32)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        lengths = []
        while sum(lengths) < t:
            short = rng.random() < 0.125
            lengths.append(int(rng.integers(1, C)) if short else int(rng.geometric(1 / 580)) + C)
        rows.append(np.repeat(np.arange(len(lengths)), lengths)[:t])
    return np.stack(rows).astype(np.int32)


def run(inner: str, b: int, t: int, iters: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from ttt_jax.ops import ttt_linear, ttt_mlp

    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    q, k, v = (jax.random.normal(kk, (b, t, H, D), jnp.bfloat16) for kk in ks[:3])
    eta = 0.01 * jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, H)))
    f = D if inner == "linear" else 4 * D
    params = dict(W1=0.02 * jax.random.normal(ks[4], (H, D, f)), b1=jnp.zeros((H, f)))
    if inner == "mlp":
        params |= dict(W2=0.02 * jax.random.normal(ks[5], (H, f, D)), b2=jnp.zeros((H, D)))
    norm = dict(ln_scale=jnp.ones((H, D)), ln_bias=jnp.zeros((H, D)))
    op = ttt_linear if inner == "linear" else ttt_mlp
    rows = []
    for layout in LAYOUTS:
        seg = segment_ids(layout, b, t)
        seg = None if seg is None else jnp.asarray(seg)

        def loss(q, k, v, eta, params, seg=seg):
            o, _ = op(
                q, k, v, eta, **params, **norm, mini_batch_size=C, segment_ids=seg,
                checkpoint_group=4, unroll=4,
            )  # fmt: skip
            return jnp.sum(o.astype(jnp.float32))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        timing = time_jitted(grad, q, k, v, eta, params, iters=iters)
        docs = 1 if seg is None else int(jnp.sum(seg[:, 1:] != seg[:, :-1])) + b
        rows.append(dict(inner=inner, layout=layout, B=b, T=t, docs=docs, **timing))
        print(rows[-1], flush=True)
    base = rows[0]["median_ms"]
    for r in rows:
        r["vs_none"] = r["median_ms"] / base
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--inner", default="linear,mlp")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.seq, args.iters = 1, 256, 2
    rows = [
        r for inner in args.inner.split(",") for r in run(inner, args.batch, args.seq, args.iters)
    ]
    columns = [("inner", "inner"), ("layout", "layout"), ("docs", "docs"),
               ("median_ms", "fwd+bwd ms"), ("vs_none", "vs none")]  # fmt: skip
    print(environment())
    print(markdown_table(rows, columns))
    if args.out:
        args.out.write_text(json.dumps(dict(env=environment(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
