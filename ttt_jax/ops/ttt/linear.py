"""TTT-Linear in dual form (Sun et al. 2024, SPEC 3.1).

Inner model `f(x) = x W + b` per sample and head. Within a mini-batch that starts at `(W, b)`,
token i reads the weights after the gradient steps of tokens `j <= i`, all gradients taken at
`(W, b)`:

    W_i = W - sum_{j<=i} E[i, j] k_j^T G_j,   b_i = b - sum_{j<=i} E[i, j] G_j
    out_i = q_i + LN(q_i W_i + b_i)

with `E[i, j] = token_scale[i] * eta[j]` and `G_j` the gradient of the inner loss at the
LayerNorm input. The dual form never builds any `W_i`:

    Z_bar = q W + b - (E * (q k^T + 1)) G

costing `O(C^2 D + C D^2)` per mini-batch instead of `O(C D^2)` memory per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from ttt_jax.ops.core.numerics import layer_norm, matmul
from ttt_jax.ops.ttt.common import (
    LN_EPS,
    check_ttt_args,
    layer_norm_l2_grad,
    lr_matrices,
    prepare_ttt,
)
from ttt_jax.ops.ttt.linear_kernel import resolve_impl, ttt_linear_pallas
from ttt_jax.ops.ttt.packed import band_dual, band_rates, run_packed_kernel

# checkpoint_name tags usable in `save_names:` / `offload_names:` remat policies.
NAMES = ("ttt_z", "ttt_grad", "ttt_z_bar")


@struct.dataclass
class TTTLinearState:
    """Per-sample fast weights: `W1: [B, H, D, D]`, `b1: [B, H, D]` (state dtype)."""

    W1: jax.Array
    b1: jax.Array


def ttt_linear(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    eta: jax.Array,
    *,
    W1: jax.Array,
    b1: jax.Array,
    ln_scale: jax.Array,
    ln_bias: jax.Array,
    mini_batch_size: int = 16,
    token_scale: jax.Array | None = None,
    initial_state: TTTLinearState | None = None,
    segment_ids: jax.Array | None = None,
    checkpoint_group: int | None = None,
    remat_policy: str | None = None,
    state_dtype=jnp.float32,
    unroll: int = 1,
    impl: str = "xla",
) -> tuple[jax.Array, TTTLinearState]:
    """TTT-Linear over a sequence.

    Args:
      q, k, v: `[B, T, H, D]` queries, keys (inner inputs) and values (the inner target is
        `v - k`); bf16 or fp32, one dtype. Matmuls run in this dtype with fp32 accumulation.
      eta: `[B, T, H]` per source-token inner learning rate.
      W1: `[H, D, D]` initial fast weight (used when `initial_state` is None).
      b1: `[H, D]` initial fast bias.
      ln_scale, ln_bias: `[H, D]` per-head LayerNorm of the inner model's output.
      mini_batch_size: C, tokens per inner gradient step. T need not be a multiple.
      token_scale: `[C]` scale of position i within a mini-batch; default `1 / (i + 1)`.
      initial_state: per-sample weights to start from (fields `[B, H, ...]`).
      segment_ids: `[B, T]` integers, a new document wherever the id changes (None: one
        document). Every document after the first restarts from `W1, b1` and counts its
        mini-batches from its first token; each document gets the outputs it would get alone.
      checkpoint_group: rematerialise groups of this many mini-batches (None: no remat).
      remat_policy: name of the remat policy inside a group (`ttt_jax.ops.core.remat`).
      state_dtype: dtype of the fast weights and their updates (fp32 by default).
      unroll: scan unroll factor (speed only).
      impl: "xla" (the scan above), "pallas" (the fused GPU kernels of `linear_kernel.py`, with
        `checkpoint_group` as their state-checkpoint spacing, default 16; `remat_policy` and
        `unroll` do not apply), "pallas_interpret" (the same kernels under the Pallas
        interpreter, for CPU tests), or "auto" (the kernels on a GPU where they support the
        call, else XLA). "pallas" on an unsupported call raises a ValueError.

    Returns:
      `o: [B, T, H, D]` in the dtype of q (`q_i + LN(f_{W_i}(q_i))`), and the state after the
      last complete mini-batch (of the last document).
    """
    check_ttt_args(
        q,
        k,
        v,
        eta,
        [
            ("W1", W1, ("H", "D", "D")),
            ("b1", b1, ("H", "D")),
            ("ln_scale", ln_scale, ("H", "D")),
            ("ln_bias", ln_bias, ("H", "D")),
        ],
        [("W1", ("H", "D", "D")), ("b1", ("H", "D"))],
        initial_state,
        mini_batch_size,
        token_scale,
        checkpoint_group,
        remat_policy,
        segment_ids,
        state_dtype=state_dtype,
        state_type=TTTLinearState,
        names=NAMES,
    )
    backend = resolve_impl(impl, q, mini_batch_size, state_dtype, segment_ids)
    call = prepare_ttt(
        q,
        {"W1": W1, "b1": b1},
        ln_scale,
        ln_bias,
        TTTLinearState,
        mini_batch_size=mini_batch_size,
        token_scale=token_scale,
        initial_state=initial_state,
        segment_ids=segment_ids,
        checkpoint_group=checkpoint_group,
        remat_policy=remat_policy,
        state_dtype=state_dtype,
        unroll=unroll,
    )
    # Everything but the matmul operands runs in `acc` (`TTTRun`).
    cd, acc, state = q.dtype, call.acc, call.state
    token_scale, ln_scale, ln_bias = call.token_scale, call.ln_scale, call.ln_bias
    ln_s, ln_b = ln_scale[None, :, None, :], ln_bias[None, :, None, :]  # against [B, H, C, D]

    def step(s: TTTLinearState, xs):
        qc, kc, vc, ec = xs  # [B, H, C, D], eta [B, H, C]
        w, bias = s.W1, s.b1.astype(acc)[:, :, None, :]
        z = checkpoint_name(matmul("bhcd,bhde->bhce", kc, w, cd) + bias, "ttt_z")
        target = vc.astype(acc) - kc.astype(acc)
        g = checkpoint_name(layer_norm_l2_grad(z, target, ln_scale, ln_bias), "ttt_grad")
        e, e_last = lr_matrices(ec.astype(acc), token_scale)
        # (q k^T + 1): the +1 is the bias's share of the inner gradient step.
        attn = e * (matmul("bhid,bhjd->bhij", qc, kc, cd) + 1.0)
        z_bar = matmul("bhcd,bhde->bhce", qc, w, cd) + bias - matmul("bhij,bhjd->bhid", attn, g, cd)
        z_bar = checkpoint_name(z_bar, "ttt_z_bar")
        out = qc.astype(acc) + layer_norm(z_bar, ln_s, ln_b, eps=LN_EPS)
        ge = g * e_last[..., None]
        new = TTTLinearState(
            W1=(s.W1.astype(acc) - matmul("bhcd,bhce->bhde", kc, ge, cd).astype(acc)).astype(
                state_dtype
            ),
            b1=(s.b1.astype(acc) - ge.sum(2)).astype(state_dtype),
        )
        return new, out

    def const_reads(qc, kw, vw, ew, band):  # reading (W1, b1): queries [B, H, C, D], window 2C
        w, bias = W1.astype(state_dtype), b1.astype(state_dtype).astype(acc)[:, None]
        z = matmul("bhcd,hde->bhce", kw, w, cd) + bias
        target = vw.astype(acc) - kw.astype(acc)
        g = layer_norm_l2_grad(z, target, ln_scale, ln_bias)
        e = band_rates(ew.astype(acc), band)
        z_bar = matmul("bhcd,hde->bhce", qc, w, cd) + bias - band_dual(qc, kw, g, e, cd)
        return qc.astype(acc) + layer_norm(z_bar, ln_s, ln_b, eps=LN_EPS)

    if backend == "xla":
        return call.run(step, const_reads, q, k, v, eta)

    def kernel(q, k, v, eta, state, flags=None, reset=None):
        o, w, bias = ttt_linear_pallas(
            q,
            k,
            v,
            eta,
            state.W1,
            state.b1,
            ln_scale,
            ln_bias,
            token_scale,
            mini_batch_size=mini_batch_size,
            checkpoint_group=checkpoint_group,
            interpret=backend == "pallas_interpret",
            segs=None if flags is None else (flags, (reset.W1, reset.b1)),
        )
        return o, TTTLinearState(W1=w, b1=bias)

    if segment_ids is None:
        return kernel(q, k, v, eta, state)
    o, state = run_packed_kernel(
        kernel, const_reads, state, call.slow, q, k, v, eta, segment_ids,
        token_scale=token_scale, mini_batch_size=mini_batch_size,
    )  # fmt: skip
    return o.astype(q.dtype), state
