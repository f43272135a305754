"""Pieces shared by TTT-Linear and TTT-MLP (SPEC 3.1): the inner loss, its gradient, the
learning-rate matrix of the dual form, argument checks, the preparation of a call
(`prepare_ttt`), and the drivers over mini-batches (`TTTRun.run` picks the packed-documents
driver of `packed.py` or the plain one)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.core.checks import (
    check_float,
    check_float_dtype,
    check_nonempty,
    check_policy_names,
    check_positive_int,
    check_shapes,
    check_state_type,
)
from ttt_jax.ops.core.chunking import merge_time, split_time
from ttt_jax.ops.core.numerics import wide_dtype
from ttt_jax.ops.core.scan import check_scan_knobs, chunked_scan
from ttt_jax.ops.ttt.packed import run_packed

LN_EPS = 1e-6


def layer_norm_l2_grad(
    z: jax.Array, target: jax.Array, scale: jax.Array, bias: jax.Array
) -> jax.Array:
    """Gradient w.r.t. `z` of `1/2 ||LN(z) - target||^2`, per token (`z, target: [B, H, C, D]`,
    `scale, bias: [H, D]`).

    Closed form of the LayerNorm backward: with `x = (z - mu) / sigma` and
    `gx = (LN(z) - target) * scale`, `dz = (gx - mean(gx) - x * mean(gx * x)) / sigma`.
    """
    mu = z.mean(-1, keepdims=True)
    inv_sigma = lax.rsqrt(((z - mu) ** 2).mean(-1, keepdims=True) + LN_EPS)
    xhat = (z - mu) * inv_sigma
    scale, bias = scale[None, :, None, :], bias[None, :, None, :]  # [H, D] -> [1, H, 1, D]
    gx = (xhat * scale + bias - target) * scale
    return (
        gx - gx.mean(-1, keepdims=True) - xhat * (gx * xhat).mean(-1, keepdims=True)
    ) * inv_sigma


def lr_matrices(eta: jax.Array, token_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Learning rates of one mini-batch in dual form.

    Args:
      eta: `[B, H, C]` per source-token rates.
      token_scale: `[C]` per target-position scales.

    Returns:
      `E: [B, H, C, C]` with `E[i, j] = token_scale[i] * eta[j]` for `j <= i`, else 0, and
      `e_last: [B, H, C]`, its last row, which produces the next mini-batch's weights.
    """
    c = eta.shape[-1]
    causal = jnp.tril(jnp.ones((1, 1, c, c), dtype=bool))
    e = jnp.where(causal, token_scale[None, None, :, None] * eta[..., None, :], 0.0)
    return e, token_scale[-1] * eta


def default_token_scale(mini_batch_size: int, dtype=jnp.float32) -> jax.Array:
    """`1 / (i + 1)` for positions `i = 0..C-1` (SPEC 3.1), computed in `dtype` (the op's
    accumulation dtype: fp64 ops need the fp64 quotients, not fp32 ones widened)."""
    return 1.0 / jnp.arange(1, mini_batch_size + 1, dtype=dtype)


def check_ttt_args(
    q,
    k,
    v,
    eta,
    params: Sequence[tuple[str, Any, tuple]],
    state_fields,
    initial_state,
    mini_batch_size,
    token_scale,
    checkpoint_group,
    remat_policy,
    segment_ids=None,
    *,
    state_dtype=None,
    state_type=None,
    names=(),
) -> dict[str, int]:
    """Checks every TTT op argument before tracing; returns the bound dims (B, T, H, D, ...).

    `state_dtype` must be floating, `initial_state` a `state_type`, and a `save_names:` policy
    may name only the op's `names`."""
    c = check_positive_int("mini_batch_size", mini_batch_size)
    if state_dtype is not None:
        check_float_dtype("state_dtype", state_dtype)
    if state_type is not None:
        check_state_type("initial_state", initial_state, state_type)
    check_float(q=q, k=k, v=v, eta=eta, token_scale=token_scale, **{n: p for n, p, _ in params})
    specs = [
        ("q", q, ("B", "T", "H", "D")),
        ("k", k, ("B", "T", "H", "D")),
        ("v", v, ("B", "T", "H", "D")),
        ("eta", eta, ("B", "T", "H")),
        *params,
        ("token_scale", token_scale, (c,)),
        ("segment_ids", segment_ids, ("B", "T")),
    ]
    if initial_state is not None:
        for name, shape in state_fields:
            specs.append((f"initial_state.{name}", getattr(initial_state, name), ("B", *shape)))
    dims = check_shapes(specs)
    check_nonempty("q", q)
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if segment_ids is not None and not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
        raise ValueError(
            "segment_ids must have an integer dtype (a new document wherever the id changes), "
            f"got {jnp.result_type(segment_ids)}"
        )
    check_scan_knobs(checkpoint_group, remat_policy)
    check_policy_names(remat_policy, names, "ttt_linear / ttt_mlp")
    return dims


def run_mini_batches(
    step: Callable[[Any, tuple], tuple[Any, jax.Array]],
    state: Any,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    eta: jax.Array,
    *,
    mini_batch_size: int,
    checkpoint_group: int | None,
    remat_policy: str | None,
    unroll: int,
) -> tuple[jax.Array, Any]:
    """Scans `step` over the mini-batches of `[B, T, H, D]` inputs.

    `step(state, (q, k, v, eta)) -> (state, out)` sees one mini-batch laid out `[B, H, C, D]`
    (`eta: [B, H, C]`) so that every matmul batches all samples and heads at once. Complete
    mini-batches go through `chunked_scan` (the memory knobs); a trailing partial one is
    zero-padded, run once, and its state update dropped.

    Returns:
      `(out [B, T, H, D] in the steps' accumulation dtype, state after the last complete
      mini-batch)`.
    """
    t = q.shape[1]
    splits = [split_time(x, mini_batch_size) for x in (q, k, v, eta)]
    # [n, B, C, H, ...] -> [n, B, H, C, ...] once, outside the loop, so no step transposes.
    full = tuple(None if f is None else jnp.swapaxes(f, 2, 3) for f, _ in splits)
    tail = tuple(None if r is None else jnp.swapaxes(r, 1, 2) for _, r in splits)
    out_full = out_tail = None
    if full[0] is not None:
        state, out_full = chunked_scan(
            step,
            state,
            full,
            checkpoint_group=checkpoint_group,
            remat_policy=remat_policy,
            unroll=unroll,
        )
        out_full = jnp.swapaxes(out_full, 2, 3)
    if tail[0] is not None:
        _, out_tail = step(state, tail)
        out_tail = jnp.swapaxes(out_tail, 1, 2)
    return merge_time(out_full, out_tail, t), state


@dataclasses.dataclass(frozen=True)
class TTTRun:
    """One TTT op call, prepared (`prepare_ttt`): what its mini-batch step reads, in the
    accumulation dtype, and how it walks the sequence (`run`).

    Attributes:
      acc: the accumulation dtype, the wider of the inputs' and the state's (SPEC 2): fp32
        under bf16 / fp32, fp64 under fp64 (no fp32 cast on the way).
      token_scale: `[C]`; ln_scale, ln_bias: `[H, D]`, all in `acc`.
      state: the state the call (its first document) starts from, fields `[B, H, ...]` in the
        state dtype.
      slow: the slow weights every later document restarts from, the same structure with
        fields `[H, ...]` (broadcast over the batch and cast to the state's dtypes by `run`).
      segment_ids, mini_batch_size, checkpoint_group, remat_policy, unroll: the op's arguments.
    """

    acc: Any
    token_scale: jax.Array
    ln_scale: jax.Array
    ln_bias: jax.Array
    state: Any
    slow: Any
    segment_ids: jax.Array | None
    mini_batch_size: int
    checkpoint_group: int | None
    remat_policy: str | None
    unroll: int

    def run(self, step, const_reads, q, k, v, eta) -> tuple[jax.Array, Any]:
        """The one driver of the TTT ops (dual and primal form): `run_packed` when documents
        are packed (`segment_ids`), else `run_mini_batches`.

        Args:
          step, const_reads: the family's mini-batch step and constant-reader outputs (as for
            `run_packed`; `const_reads` is used only with `segment_ids`).
          q, k, v, eta: the op's inputs (`[B, T, H, D]`, `[B, T, H]`).

        Returns:
          `(out [B, T, H, D] in the dtype of q, state after the last complete mini-batch)`.
        """
        knobs = dict(
            mini_batch_size=self.mini_batch_size,
            checkpoint_group=self.checkpoint_group,
            remat_policy=self.remat_policy,
            unroll=self.unroll,
        )
        state = self.state
        if self.segment_ids is None:
            out, state = run_mini_batches(step, state, q, k, v, eta, **knobs)
        else:
            reset = jax.tree.map(
                lambda p, s: jnp.broadcast_to(p, s.shape).astype(s.dtype), self.slow, state
            )
            out, state = run_packed(
                step, const_reads, state, reset, q, k, v, eta, self.segment_ids,
                token_scale=self.token_scale, **knobs,
            )  # fmt: skip
        return out.astype(q.dtype), state


def prepare_ttt(
    q: jax.Array,
    params: dict[str, jax.Array],
    ln_scale: jax.Array,
    ln_bias: jax.Array,
    state_type: type,
    *,
    mini_batch_size: int,
    token_scale: jax.Array | None,
    initial_state: Any,
    segment_ids: jax.Array | None,
    checkpoint_group: int | None,
    remat_policy: str | None,
    state_dtype,
    unroll: int,
) -> TTTRun:
    """The `TTTRun` of a checked TTT op call (dual or primal form): the default token scale
    `1 / (i + 1)` where none is given, the per-sample state broadcast from the slow weights
    `params` (fields `[H, ...]`, the `state_type`'s) where no `initial_state` is, everything
    cast to its dtype."""
    acc = wide_dtype(q.dtype, state_dtype)
    if token_scale is None:
        token_scale = default_token_scale(mini_batch_size, acc)
    if initial_state is None:
        b = q.shape[0]
        initial_state = state_type(
            **{n: jnp.broadcast_to(p, (b, *p.shape)) for n, p in params.items()}
        )
    return TTTRun(
        acc=acc,
        token_scale=token_scale.astype(acc),
        ln_scale=ln_scale.astype(acc),
        ln_bias=ln_bias.astype(acc),
        state=jax.tree.map(lambda x: x.astype(state_dtype), initial_state),
        slow=state_type(**params),
        segment_ids=segment_ids,
        mini_batch_size=mini_batch_size,
        checkpoint_group=checkpoint_group,
        remat_policy=remat_policy,
        unroll=unroll,
    )
