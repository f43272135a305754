"""Where one LaCT chunk's time goes (issue 3's speed goal): each piece of the chunk step timed
alone under `jax.jit`, at the 760M layer shape (B=4, H=4, D = Dh = 384, C=2048, bf16 q/k/v,
fp32 state), next to its matmul FLOPs and the time those would take at the bf16 matmul peak
measured in the same process. Each piece runs `--reps` times inside one jitted `fori_loop`
(the loop carry perturbs the first input and takes the sum of every output, so nothing is
hoisted or dropped), so the per-call dispatch and sync (~0.1-0.2 ms on a GPU) is spread over
the repetitions; the summing adds one read of the outputs per repetition.

    PYTHONPATH=. python benchmarks/lact_chunk_breakdown.py            # GPU
    PYTHONPATH=. python benchmarks/lact_chunk_breakdown.py --smoke    # CPU, tiny shapes

Prints one table: piece, median ms, GFLOP, ideal ms at the peak, measured / ideal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, time_jitted  # noqa: E402

from ttt_jax.ops.lact.math import (  # noqa: E402
    NS_COEFFS,
    Chunk,
    ChunkConfig,
    apply_fast_weights,
    chunk_step,
    inner_grads,
    orthogonalise,
    renormalise_rows,
    row_norms,
)


def repeated(fn, reps: int):
    """`fn` run `reps` times in one jitted loop; each run depends on the last (module doc)."""

    def run(*args):
        def body(_, eps):
            first = jax.tree.map(lambda x: x + eps.astype(x.dtype), args[0])
            out = fn(first, *args[1:])
            return eps + 0.0 * sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(out))

        return jax.lax.fori_loop(0, reps, body, jnp.float32(0.0))

    return jax.jit(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    b, h, d, dh, c = (1, 2, 16, 16, 32) if a.smoke else (4, 4, 384, 384, 2048)
    ks = iter(jax.random.split(jax.random.PRNGKey(0), 16))
    tok = lambda: (jax.random.normal(next(ks), (b, c, h, d)) / d**0.5).astype(jnp.bfloat16)  # noqa: E731
    rate = lambda: 1e-3 * jax.nn.softplus(jax.random.normal(next(ks), (b, c, h)))  # noqa: E731
    eye = 0.5 * jnp.eye(dh, d)
    w0 = eye + 0.02 * jax.random.normal(next(ks), (b, h, dh, d))
    w2 = eye + 0.02 * jax.random.normal(next(ks), (b, h, dh, d))
    w1 = jax.random.normal(next(ks), (b, h, d, dh)) / dh**0.5
    ws = (w0, w1, w2)
    ms = tuple(0.01 * jax.random.normal(next(ks), w.shape) for w in ws)
    chunk = Chunk(tok(), tok(), tok(), rate(), rate(), rate(), jax.nn.sigmoid(rate() * 1e3))
    norms = tuple(row_norms(w[0]) for w in ws)
    bf16 = jnp.dtype(jnp.bfloat16)
    cfg = ChunkConfig(
        chunk_size=c,
        use_momentum=True,
        use_muon=True,
        weight_norm=True,
        compute_dtype=bf16,
        muon_dtype=bf16,
        state_dtype=jnp.dtype(jnp.float32),
        checkpoint_group=None,
        remat_policy=None,
    )

    n = 2 * b * h * c * d * dh  # one [C, D] x [D, Dh] matmul
    r, s = min(d, dh), max(d, dh)
    ns = b * h * 3 * len(NS_COEFFS) * (4 * r * r * s + 2 * r**3)

    no_muon = cfg._replace(use_muon=False)

    def step_loss(state, chunk, cfg=cfg):
        new, o = chunk_step(state, chunk, norms, cfg)
        return jnp.sum(o.astype(jnp.float32)) + sum(jnp.sum(w) for w in new[0])

    pieces = {
        "apply (read)": (lambda ws, q: apply_fast_weights(ws, q, bf16), (ws, chunk.q), 3 * n),
        "inner_grads": (
            lambda ws, k, v, l0, l1, l2: inner_grads(ws, k, v, l0, l1, l2, bf16),
            (ws, chunk.k, chunk.v, chunk.lr0, chunk.lr1, chunk.lr2),
            6 * n,
        ),
        "Newton-Schulz (3 updates)": (lambda gs: orthogonalise(gs, bf16), (ms,), ns),
        "weight norm": (
            lambda ws: tuple(renormalise_rows(w, nr) for w, nr in zip(ws, norms, strict=True)),
            (ws,),
            0,
        ),
        "chunk_step (all, fwd)": (
            lambda state, chunk: chunk_step(state, chunk, norms, cfg),
            ((ws, ms), chunk),
            9 * n + ns,
        ),
        "chunk_step fwd+bwd": (
            jax.grad(step_loss, argnums=(0, 1)),
            ((ws, ms), chunk),
            3 * (9 * n + ns),
        ),
        "chunk_step without Muon, fwd": (
            lambda state, chunk: chunk_step(state, chunk, norms, no_muon),
            ((ws, ms), chunk),
            9 * n,
        ),
        "chunk_step without Muon, fwd+bwd": (
            jax.grad(lambda st, ch: step_loss(st, ch, no_muon), argnums=(0, 1)),
            ((ws, ms), chunk),
            27 * n,
        ),
    }
    x = jax.random.normal(next(ks), (8192, 8192), jnp.bfloat16)
    mm = time_jitted(jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32)), x)
    peak = 2 * 8192**3 / (mm["min_ms"] * 1e-3)
    print(environment())
    print(f"B={b} H={h} D={d} Dh={dh} C={c}; bf16 matmul peak {peak / 1e12:.1f} TFLOP/s\n")
    print("| piece | median ms | GFLOP | ideal ms | measured / ideal |\n|---|---|---|---|---|")
    for name, (fn, args, flops) in pieces.items():
        t = time_jitted(repeated(fn, a.reps), *args, warmup=2, iters=a.iters)["median_ms"]
        t /= a.reps
        ideal = flops / peak * 1e3
        ratio = f"{t / ideal:.1f}" if flops else "-"
        print(f"| {name} | {t:.3f} | {flops / 1e9:.1f} | {ideal:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
