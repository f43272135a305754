"""TTT-Linear and TTT-MLP in primal form: the baseline the dual form is measured against.

The primal form does what SPEC 3.1 says literally: per mini-batch it takes each token's inner
gradient with `jax.grad`, materialises every token's weights `W_i` (`[B, H, C, ...]` per
mini-batch) and applies them. Training differentiates through all of it with plain autodiff.
It is slower and heavier than the dual form (`ttt_linear`, `ttt_mlp`) and exists as an
in-library oracle for tests and as the benchmark baseline; same signature, same results.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ttt_jax.ops.core.numerics import gelu_tanh, layer_norm, matmul
from ttt_jax.ops.ttt.common import LN_EPS, prepare_ttt
from ttt_jax.ops.ttt.linear import TTTLinearState, ttt_linear
from ttt_jax.ops.ttt.mlp import TTTMLPState, ttt_mlp
from ttt_jax.ops.ttt.packed import band_rates

Inner = Callable[[dict, jax.Array], jax.Array]


def _linear_inner(p: dict, x: jax.Array, cd) -> jax.Array:
    return matmul("d,de->e", x, p["W1"], cd) + p["b1"]


def _mlp_inner(p: dict, x: jax.Array, cd) -> jax.Array:
    h = gelu_tanh(matmul("d,df->f", x, p["W1"], cd) + p["b1"])
    return matmul("f,fd->d", h, p["W2"], cd) + p["b2"]


# The primal twins' keyword knobs: the dual-form op's own, with its defaults.
KNOBS = (
    "mini_batch_size",
    "token_scale",
    "initial_state",
    "segment_ids",
    "checkpoint_group",
    "remat_policy",
    "state_dtype",
    "unroll",
)


def _primal(dual_op, inner: Inner, state_cls, q, k, v, eta, params: dict, ln_scale, ln_bias, knobs):
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise TypeError(f"{dual_op.__name__}_primal() got unexpected keyword arguments {unknown}")
    defaults = inspect.signature(dual_op).parameters
    knobs = {name: knobs.get(name, defaults[name].default) for name in KNOBS}
    # The dual-form op owns the argument checks; running them here keeps the twins in step.
    jax.eval_shape(
        lambda: dual_op(q, k, v, eta, **params, ln_scale=ln_scale, ln_bias=ln_bias, **knobs)
    )
    call = prepare_ttt(q, params, ln_scale, ln_bias, state_cls, **knobs)
    cd, acc, ts = q.dtype, call.acc, call.token_scale  # as in the dual form
    ln_s, ln_b, state_dtype = call.ln_scale, call.ln_bias, knobs["state_dtype"]

    def head_norm(y, h):  # y: [D] of head h
        return layer_norm(y, ln_s[h], ln_b[h], eps=LN_EPS)

    def token_loss(p, h, kt, vt):
        y = head_norm(inner(p, kt, cd), h)
        return 0.5 * jnp.sum((y - (vt.astype(acc) - kt.astype(acc))) ** 2)

    def one_head(p, h, qc, kc, vc, ec):  # p: one sample-head's weights; qc: [C, D]
        grads = jax.vmap(jax.grad(token_loss), in_axes=(None, None, 0, 0))(p, h, kc, vc)
        steps = jax.tree.map(
            lambda g: jnp.cumsum(ec.reshape(-1, *[1] * (g.ndim - 1)) * g, 0), grads
        )
        w_i = jax.tree.map(lambda w, s: w - ts.reshape(-1, *[1] * (s.ndim - 1)) * s, p, steps)
        out = jax.vmap(lambda w, x: head_norm(inner(w, x, cd), h))(w_i, qc)
        return qc.astype(acc) + out, jax.tree.map(lambda w: w[-1], w_i)

    heads = jnp.arange(q.shape[2])
    per_head = jax.vmap(one_head, in_axes=(0, 0, 0, 0, 0, 0))
    per_sample = jax.vmap(per_head, in_axes=(0, None, 0, 0, 0, 0))

    def step(s, xs):
        qc, kc, vc, ec = xs
        weights = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
        out, new = per_sample(weights, heads, qc, kc, vc, ec.astype(acc))
        return state_cls(**{n: x.astype(state_dtype) for n, x in new.items()}), out

    def const_reads(qc, kw, vw, ew, band):  # reading the params: queries [B, H, C, D]
        p0 = {n: p.astype(state_dtype) for n, p in params.items()}
        grad = jax.vmap(jax.grad(token_loss), in_axes=(None, None, 0, 0))  # tokens
        grad = jax.vmap(grad, in_axes=(0, 0, 0, 0))  # heads
        grad = jax.vmap(grad, in_axes=(None, None, 0, 0))  # samples
        grads = grad(p0, heads, kw, vw)  # [B, H, 2C, ...]: the window's, all at p0
        e = band_rates(ew.astype(acc), band)
        # W_i = W - sum_j E[i, j] grad_j over the token's document.
        w_i = jax.tree.map(
            lambda w, g: w[:, None] - jnp.einsum("bhij,bhj...->bhi...", e, g), p0, grads
        )
        read = jax.vmap(lambda w, x, h: head_norm(inner(w, x, cd), h), (0, 0, None))
        read = jax.vmap(read, in_axes=(0, 0, 0))  # heads
        read = jax.vmap(read, in_axes=(0, 0, None))  # samples
        return qc.astype(acc) + read(w_i, qc, heads)

    return call.run(step, const_reads, q, k, v, eta)


def ttt_linear_primal(q, k, v, eta, *, W1, b1, ln_scale, ln_bias, **knobs):
    """Primal-form twin of `ttt_linear`: same arguments (keyword knobs as there), same results,
    materialised `W_i`."""
    params = {"W1": W1, "b1": b1}
    return _primal(
        ttt_linear, _linear_inner, TTTLinearState, q, k, v, eta, params, ln_scale, ln_bias, knobs
    )


def ttt_mlp_primal(q, k, v, eta, *, W1, b1, W2, b2, ln_scale, ln_bias, **knobs):
    """Primal-form twin of `ttt_mlp`: same arguments (keyword knobs as there), same results,
    materialised `W_i`."""
    params = {"W1": W1, "b1": b1, "W2": W2, "b2": b2}
    return _primal(ttt_mlp, _mlp_inner, TTTMLPState, q, k, v, eta, params, ln_scale, ln_bias, knobs)
