"""Which scan structures lower and keep their gradients under an `offload_names:` remat policy.

A toy TTT step (carry `W: [B, D, D]`, residuals tagged `z`, `g`) scanned over N chunks three
ways: the nested structure of checkpoint groups (an outer scan over checkpointed inner scans of
G chunks, with inner unroll 1, G and full), one checkpointed step per chunk in a single scan,
and groups as a Python loop. Each line says whether XLA compiled it, whether the program holds
host-memory buffers (`S(5)`), and the gradients' largest relative difference from the same
structure with `save_names:` (no offload). GPU only (the CPU lowers host offload to nothing).

    PYTHONPATH=. python benchmarks/offload_probe.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from ttt_jax.ops.core.remat import resolve_policy

B, D, C, N, G = 2, 16, 4, 12, 3
OFFLOAD = "offload_names:z,g"


def step(w, x):
    z = checkpoint_name(jnp.einsum("bcd,bde->bce", x, w), "z")
    g = checkpoint_name(jnp.tanh(z), "g")
    return w - 0.1 * jnp.einsum("bcd,bce->bde", x, g), jnp.einsum("bce,bde->bcd", g, w)


def ckpt(fn, policy):
    return jax.checkpoint(fn, policy=resolve_policy(policy), prevent_cse=False)


def nested(policy, unroll):
    def run(w, xs):
        group = ckpt(lambda c, xg: lax.scan(step, c, xg, unroll=unroll), policy)
        w, ys = lax.scan(group, w, xs.reshape(N // G, G, *xs.shape[1:]))
        return w, ys.reshape(N, *ys.shape[2:])

    return run


def flat(policy):
    return lambda w, xs: lax.scan(ckpt(step, policy), w, xs)


def python_groups(policy):
    def run(w, xs):
        group = ckpt(lambda c, xg: lax.scan(step, c, xg), policy)
        ys = []
        for i in range(N // G):
            w, y = group(w, xs[i * G : (i + 1) * G])
            ys.append(y)
        return w, jnp.concatenate(ys)

    return run


def grad_fn(run):
    def loss(w, xs):
        w2, ys = run(w, xs)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(w2**2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main() -> None:
    w = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (B, D, D))
    xs = jax.random.normal(jax.random.PRNGKey(1), (N, B, C, D))
    ref = grad_fn(nested("save_names:z,g", 1))(w, xs)
    cases = {
        "nested": nested(OFFLOAD, 1),
        "nested_unroll_full": nested(OFFLOAD, True),
        "nested_unroll_G": nested(OFFLOAD, G),
        "flat": flat(OFFLOAD),
        "python_groups": python_groups(OFFLOAD),
    }
    for name, run in cases.items():
        fn = grad_fn(run)
        try:
            text = fn.lower(w, xs).compile().as_text()
            got = fn(w, xs)
        except Exception as e:  # noqa: BLE001 - the probe reports every failure and goes on
            print(f"PROBE {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        err = max(
            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(got, ref, strict=True)
        )
        host = "S(5)" in text
        print(f"PROBE {name}: compiled, host buffers S(5): {host}, max rel err vs saved {err:.2e}")


if __name__ == "__main__":
    main()
