"""Shared by the In-Place TTT op tests (`test_inplace_forward.py`, `test_inplace_grads.py`,
`test_inplace_errors.py`): small inputs, the plain per-document, per-chunk reference the op is
checked against, the jitted op and the gradient of a random linear loss. Each gradient is a one-off
program, compiled with the fast CPU options (`tests.memory_helpers.run_fast`); the op and the
reference are `jax.jit`s (the op one cached jit that many tests call with the same shapes, the
reference also called inside those gradients)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tests.memory_helpers import run_fast
from ttt_jax.ops.inplace.op import InPlaceState, inplace_ttt

HI = jax.lax.Precision.HIGHEST
Bn, T, F, D, C = 2, 23, 7, 5, 4
ETA = 0.1
TAU = 20.0  # between the smallest and largest chunk delta norms of make_inputs()
IMPLS = [(p, b) for p in ("sequential", "associative") for b in ("custom", "autodiff")]
# Packed documents: short ones (no complete chunk), one of exactly C, ones with complete chunks
# and a tail, starting mid-chunk; row 1 has a long first document with a tail.
SEGMENTS = np.array(
    [
        [0] * 3 + [1] * 9 + [2] * 2 + [3] * 4 + [4] * 5,
        [7] * 10 + [3] * 3 + [9] * 10,
    ],
    np.int32,
)


def make_inputs(seed=0, t=T, k=5, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 6)
    return dict(
        z=jax.random.normal(ks[0], (Bn, t, F), dtype),
        target=jax.random.normal(ks[1], (Bn, t, D), dtype),
        w_down=jax.random.normal(ks[2], (D, F), dtype),
        w_target=0.3 * jax.random.normal(ks[3], (D, D), dtype),
        conv_kernel=jax.random.normal(ks[4], (k, D), dtype),
        w_init=jax.random.normal(ks[5], (Bn, D, F), dtype),
    )


# --- the plain reference: documents and chunks in Python loops, weights materialised


def ref_conv(x, kernel, mode):
    """`[n, d]` -> `[n, d]`, zero outside the n rows."""
    k = kernel.shape[0]
    off = k // 2 if mode == "centered" else 0
    n = x.shape[0]
    xp = jnp.concatenate([jnp.zeros((off, x.shape[1])), x, jnp.zeros((k - 1 - off, x.shape[1]))])
    return sum(kernel[j][None] * xp[j : j + n] for j in range(k))


def reference(
    z,
    target,
    w_down,
    w_target,
    conv_kernel,
    eta,
    *,
    chunk_size,
    conv_mode="centered",
    clip_tau=None,
    segment_ids=None,
    w_init=None,
    inclusive=False,
):
    """Per sample, per document, per chunk: `O = Z W^T`, then `W += eta * clip(V^T Z)` on
    complete chunks. `inclusive=True` is the leaking bug (a chunk reads its own update)."""
    outs, finals = [], []
    for b in range(z.shape[0]):
        seg = np.zeros(z.shape[1], int) if segment_ids is None else np.asarray(segment_ids[b])
        starts = [0] + [t for t in range(1, len(seg)) if seg[t] != seg[t - 1]]
        ob = []
        for i, (s0, s1) in enumerate(zip(starts, starts[1:] + [len(seg)], strict=True)):
            w = w_init[b] if (i == 0 and w_init is not None) else w_down
            for c0 in range(s0, s1, chunk_size):
                c1 = min(c0 + chunk_size, s1)
                zc = z[b, c0:c1]
                delta = None
                if c1 - c0 == chunk_size:
                    v = jnp.einsum(
                        "cd,de->ce",
                        ref_conv(target[b, c0:c1], conv_kernel, conv_mode),
                        w_target,
                        precision=HI,
                    )
                    delta = jnp.einsum("cd,cf->df", v, zc, precision=HI)
                    if clip_tau is not None:
                        delta = delta * jnp.minimum(1.0, clip_tau / jnp.sqrt(jnp.sum(delta**2)))
                if inclusive and delta is not None:
                    w = w + eta * delta
                ob.append(jnp.einsum("cf,df->cd", zc, w, precision=HI))
                if not inclusive and delta is not None:
                    w = w + eta * delta
        outs.append(jnp.concatenate(ob))
        finals.append(w)
    return jnp.stack(outs), jnp.stack(finals)


STATIC = (
    "chunk_size",
    "conv_mode",
    "clip_tau",
    "prefix",
    "backward",
    "checkpoint_group",
    "remat_policy",
)


@functools.partial(jax.jit, static_argnames=STATIC)
def _jit_op(inputs, eta, segment_ids, chunk_size=C, **static):
    w_init = inputs.get("w_init")
    return inplace_ttt(
        inputs["z"],
        inputs["target"],
        w_down=inputs["w_down"],
        w_target=inputs["w_target"],
        conv_kernel=inputs["conv_kernel"],
        eta=eta,
        chunk_size=chunk_size,
        segment_ids=segment_ids,
        initial_state=None if w_init is None else InPlaceState(w_down=w_init),
        **static,
    )


def run_op(inputs, eta=ETA, segment_ids=None, **static):
    """The op, jitted (eager dispatch compiles every small op once per shape: far slower)."""
    return _jit_op(inputs, eta, segment_ids, **static)


def run_ref(inputs, eta=ETA, **kw):
    """The reference, traced once and compiled (its Python loops are slow to run op by op)."""
    args = [inputs[k] for k in ("z", "target", "w_down", "w_target", "conv_kernel")]
    fn = functools.partial(reference, chunk_size=kw.pop("chunk_size", C), **kw)
    return jax.jit(fn)(*args, eta, w_init=inputs.get("w_init"))


# --- gradients of a random linear loss


def loss_fn(run, inputs, ct, cs):
    o, w = run(inputs)
    w = w.w_down if isinstance(w, InPlaceState) else w
    return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(w * cs)


GRAD_KEYS = ("z", "target", "w_down", "w_target", "conv_kernel", "eta", "w_init")


def grads_of(run, inputs, eta=ETA, seed=9):
    k1, k2 = jax.random.split(jax.random.key(seed))
    ct = jax.random.normal(k1, (Bn, inputs["z"].shape[1], D))
    cs = jax.random.normal(k2, (Bn, D, F))

    def loss(params):
        params = dict(params)
        eta = params.pop("eta")
        return loss_fn(lambda p: run(p, eta), params, ct, cs)

    return run_fast(jax.grad(loss), dict(inputs, eta=jnp.asarray(eta)))
