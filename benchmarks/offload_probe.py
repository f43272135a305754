"""Which scan structures (nested checkpoint groups, flat per-chunk checkpoints, Python groups)
lower and keep their gradients under an `offload_names:` remat policy. GPU only.

    PYTHONPATH=. python benchmarks/offload_probe.py

Which scan structures compile and keep gradients with an offload_names remat policy on GPU."""
import traceback
import jax, jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
import jax.ad_checkpoint as adc
from ttt_jax.ops.core.remat import resolve_policy

B, D, C, N, G = 2, 16, 4, 12, 3

def step(w, x):
    z = checkpoint_name(jnp.einsum("bcd,bde->bce", x, w), "z")
    g = checkpoint_name(jnp.tanh(z), "g")
    return w - 0.1 * jnp.einsum("bcd,bce->bde", x, g), jnp.einsum("bce,bde->bcd", g, w)

def nested(policy, unroll):
    def f(w, xs):
        def group(c, xg):
            return lax.scan(step, c, xg, unroll=unroll)
        group = jax.checkpoint(group, policy=resolve_policy(policy), prevent_cse=False)
        xg = xs.reshape(N // G, G, *xs.shape[1:])
        w, ys = lax.scan(group, w, xg)
        return w, ys.reshape(N, *ys.shape[2:])
    return f

def flat(policy):
    def f(w, xs):
        return lax.scan(jax.checkpoint(step, policy=resolve_policy(policy), prevent_cse=False), w, xs)
    return f

def python_groups(policy):
    # outer loop as Python (no outer scan), inner scans checkpointed
    def f(w, xs):
        ys = []
        for i in range(N // G):
            g = jax.checkpoint(lambda c, xg: lax.scan(step, c, xg), policy=resolve_policy(policy), prevent_cse=False)
            w, y = g(w, xs[i * G:(i + 1) * G]); ys.append(y)
        return w, jnp.concatenate(ys)
    return f

def loss_of(f):
    def loss(w, xs):
        w2, ys = f(w, xs)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(w2 ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

w = jax.random.normal(jax.random.PRNGKey(0), (B, D, D)) * 0.3
xs = jax.random.normal(jax.random.PRNGKey(1), (N, B, C, D))
ref = loss_of(nested("save_names:z,g", 1))(w, xs)
off = "offload_names:z,g"
for name, f in [("nested", nested(off, 1)), ("nested_unroll_full", nested(off, True)),
                ("nested_unroll_G", nested(off, G)), ("flat", flat(off)), ("python_groups", python_groups(off))]:
    try:
        fn = loss_of(f)
        txt = fn.lower(w, xs).compile().as_text()
        got = fn(w, xs)
        err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, ref))
        print(f"PROBE {name}: compiled, host buffers S(5): {'S(5)' in txt}, max rel err vs saved {err:.2e}")
    except Exception as e:
        print(f"PROBE {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
