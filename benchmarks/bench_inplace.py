"""Speed and memory of the In-Place TTT MLP (SPEC 3.3) against the same gated MLP without it.

`InPlaceMLP` (SwiGLU, `W_down` the fast weight, targets from the token embeddings) at B=1,
d x F in {2048 x 6144, 4096 x 14336}, chunk C in {1024, 4096}, T in {8192, 32768}, compute
bf16 with fp32 parameters and fast-weight state (`MixedPrecision.named("bf16")`). The baseline
is the same layer with `ttt=False` (the plain gated MLP, same parameters), which does not
depend on C. Forward and forward+backward (gradients of every parameter, the input and the
embeddings) times are medians of `--iters` jitted calls after warm-up, each ended with
`block_until_ready`. Memory: the allocator's `peak_bytes_in_use` after the forward runs and
again after the forward+backward runs (one fresh process per config, so peaks are that
config's own; parameters and inputs included), and the compiler's planned temporaries.

    PYTHONPATH=. python benchmarks/bench_inplace.py --out $OUT/inplace_h100.json   # GPU
    PYTHONPATH=. python benchmarks/bench_inplace.py --smoke                         # CPU, ~1 min

Variants: `plain`, `inplace` (the default op: sequential prefix, custom VJP) and, on request
(`--variants plain inplace inplace_assoc`), `inplace_assoc` (associative prefix: parallel over
chunks, materialises per-chunk states in its forward).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, markdown_table, measure_modes, ran_as_child, run_in_subprocess  # noqa: E402

MODELS = {"2048x6144": (2048, 6144), "4096x14336": (4096, 14336)}
# variant -> (ttt, prefix)
VARIANTS = {
    "plain": (False, "sequential"),
    "inplace": (True, "sequential"),
    "inplace_assoc": (True, "associative"),
}
SMOKE = dict(models={"64x128": (64, 128)}, chunks=[16], seqs=[64, 128], iters=2)


def run_one(cfg: dict) -> dict:
    """One config in this process: compile, time forward then forward+backward, read peaks."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ttt_jax.layers.common import MixedPrecision
    from ttt_jax.layers.inplace_mlp import InPlaceMLP, InPlaceMLPConfig

    d, f = cfg["d_model"], cfg["d_ff"]
    ttt, prefix = VARIANTS[cfg["variant"]]
    precision = MixedPrecision.named("bf16")
    mlp_cfg = InPlaceMLPConfig(
        d_model=d, d_ff=f, chunk_size=cfg["chunk"], ttt=ttt, prefix=prefix, precision=precision
    )
    model = InPlaceMLP(mlp_cfg, rngs=nnx.Rngs(0))
    # Non-zero conv taps so that the fast weight really moves (at init it would not).
    model.ttt_conv[...] = 0.02 * jax.random.normal(jax.random.key(2), model.ttt_conv[...].shape)
    graphdef, params = nnx.split(model, nnx.Param)
    kx, ke = jax.random.split(jax.random.key(1))
    shape = (cfg["batch"], cfg["seq"], d)
    x = jax.random.normal(kx, shape, precision.compute_dtype)
    emb = jax.random.normal(ke, shape, precision.compute_dtype)

    def forward(params, x, emb):
        return nnx.merge(graphdef, params)(x, emb)

    def loss(params, x, emb):
        return jnp.mean(jnp.square(forward(params, x, emb).astype(jnp.float32)))

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return {**cfg, **measure_modes(dict(fwd=fwd, fwdbwd=fwd_bwd), (params, x, emb), cfg["iters"])}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds, to each In-Place row, its time and peak over the plain MLP of the same shape."""
    plain = {(r["model"], r["seq"]): r for r in rows if r["variant"] == "plain"}
    for r in rows:
        base = plain.get((r["model"], r["seq"]))
        if r["variant"] == "plain" or base is None or "error" in r or "error" in base:
            continue
        for key in ("fwd_median_ms", "fwdbwd_median_ms", "fwdbwd_peak_gb"):
            if r.get(key) is not None and base.get(key):
                r[f"{key}_x_plain"] = r[key] / base[key]
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", help="internal: run one JSON config in this process")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--chunks", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--seqs", nargs="+", type=int, default=[8192, 32768])
    p.add_argument("--variants", nargs="+", default=["plain", "inplace"], choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", help="write the environment, command and results as JSON here")
    a = p.parse_args()
    if ran_as_child(a.one, run_one):
        return
    models = {k: MODELS[k] for k in a.models}
    if a.smoke:
        models, a.chunks, a.seqs, a.iters = (
            SMOKE[k] for k in ("models", "chunks", "seqs", "iters")
        )
    rows = []
    for name, (d, f) in models.items():
        for t in a.seqs:
            for v in a.variants:
                # The plain MLP has no chunks: once per shape.
                for c in a.chunks if v != "plain" else [None]:
                    cfg = dict(
                        model=name,
                        d_model=d,
                        d_ff=f,
                        batch=a.batch,
                        seq=t,
                        chunk=c or a.chunks[0],
                        variant=v,
                        iters=a.iters,
                    )
                    r = run_in_subprocess(__file__, cfg)
                    if v == "plain":
                        r["chunk"] = None
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    rows = with_ratios(rows)
    env = environment()
    command = "python " + " ".join(shlex.quote(s) for s in sys.argv)
    if a.out:
        Path(a.out).write_text(
            json.dumps(dict(environment=env, command=command, results=rows), indent=1)
        )
    print(f"\n{env}\n`{command}`\n")
    print(
        markdown_table(
            rows,
            [
                ("model", "d x F"),
                ("batch", "B"),
                ("seq", "T"),
                ("chunk", "C"),
                ("variant", "variant"),
                ("fwd_median_ms", "fwd ms"),
                ("fwdbwd_median_ms", "fwd+bwd ms"),
                ("fwd_peak_gb", "fwd peak GB"),
                ("fwdbwd_peak_gb", "fwd+bwd peak GB"),
                ("fwdbwd_temp_gb", "planned temp GB"),
                ("fwd_median_ms_x_plain", "fwd x plain"),
                ("fwdbwd_median_ms_x_plain", "fwd+bwd x plain"),
                ("fwdbwd_peak_gb_x_plain", "peak x plain"),
                ("error", "error"),
            ],
        )
    )


if __name__ == "__main__":
    main()
