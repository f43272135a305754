"""TTT-MLP in dual form (Sun et al. 2024, SPEC 3.1).

Inner model `f(x) = gelu_tanh(x W1 + b1) W2 + b2` per sample and head, hidden width F (4D by
default). Every gradient of a mini-batch is taken at its start weights, so each layer of the
inner MLP has the same dual form as TTT-Linear, the first with the keys as inputs and the
second with the hidden activations `X2 = gelu(k W1 + b1)`:

    Z1_bar = q W1 + b1 - (E * (q k^T + 1)) G1
    X2_bar = gelu(Z1_bar)
    Z2_bar = X2_bar W2 + b2 - (E * (X2_bar X2^T + 1)) G2
    out    = q + LN(Z2_bar)

where `G2` is the gradient at the LayerNorm input and `G1 = (G2 W2^T) * gelu'(Z1)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from ttt_jax.ops.core.numerics import gelu_tanh, gelu_tanh_grad, layer_norm, matmul
from ttt_jax.ops.ttt.common import (
    LN_EPS,
    check_ttt_args,
    layer_norm_l2_grad,
    lr_matrices,
    prepare_ttt,
)
from ttt_jax.ops.ttt.mlp_kernel import resolve_impl, ttt_mlp_pallas
from ttt_jax.ops.ttt.packed import band_dual, band_rates, run_packed_kernel

NAMES = ("ttt_z", "ttt_grad", "ttt_z_bar")


@struct.dataclass
class TTTMLPState:
    """Per-sample fast weights.

    `W1 [B, H, D, F]`, `b1 [B, H, F]`, `W2 [B, H, F, D]`, `b2 [B, H, D]`.
    """

    W1: jax.Array
    b1: jax.Array
    W2: jax.Array
    b2: jax.Array


def ttt_mlp(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    eta: jax.Array,
    *,
    W1: jax.Array,
    b1: jax.Array,
    W2: jax.Array,
    b2: jax.Array,
    ln_scale: jax.Array,
    ln_bias: jax.Array,
    mini_batch_size: int = 16,
    token_scale: jax.Array | None = None,
    initial_state: TTTMLPState | None = None,
    segment_ids: jax.Array | None = None,
    checkpoint_group: int | None = None,
    remat_policy: str | None = None,
    state_dtype=jnp.float32,
    unroll: int = 1,
    impl: str = "xla",
) -> tuple[jax.Array, TTTMLPState]:
    """TTT-MLP over a sequence.

    Args:
      q, k, v: `[B, T, H, D]` (inner target `v - k`), bf16 or fp32, one dtype.
      eta: `[B, T, H]` per source-token inner learning rate.
      W1: `[H, D, F]`, b1: `[H, F]`, W2: `[H, F, D]`, b2: `[H, D]` initial fast weights.
      ln_scale, ln_bias: `[H, D]` per-head LayerNorm of the inner model's output.
      mini_batch_size, token_scale, initial_state, segment_ids, checkpoint_group,
      remat_policy, state_dtype, unroll: as in `ttt_linear` (documents restart from
      `W1, b1, W2, b2`).
      impl: "xla" (the scan here), "pallas" (the fused GPU kernels of `mlp_kernel.py`, with
        `checkpoint_group` as their state-checkpoint spacing, default 16; `remat_policy` and
        `unroll` do not apply), "pallas_interpret" (the same kernels under the Pallas
        interpreter, for CPU tests), or "auto" (the kernels on a GPU where they support the
        call, else XLA; calls with `segment_ids` take XLA). "pallas" on an unsupported call
        raises a ValueError.

    Returns:
      `o: [B, T, H, D]` in the dtype of q, and the state after the last complete mini-batch.
    """
    check_ttt_args(
        q,
        k,
        v,
        eta,
        [
            ("W1", W1, ("H", "D", "F")),
            ("b1", b1, ("H", "F")),
            ("W2", W2, ("H", "F", "D")),
            ("b2", b2, ("H", "D")),
            ("ln_scale", ln_scale, ("H", "D")),
            ("ln_bias", ln_bias, ("H", "D")),
        ],
        [("W1", ("H", "D", "F")), ("b1", ("H", "F")), ("W2", ("H", "F", "D")), ("b2", ("H", "D"))],
        initial_state,
        mini_batch_size,
        token_scale,
        checkpoint_group,
        remat_policy,
        segment_ids,
        state_dtype=state_dtype,
        state_type=TTTMLPState,
        names=NAMES,
    )
    backend = resolve_impl(impl, q, W1.shape[-1], mini_batch_size, state_dtype, segment_ids)
    call = prepare_ttt(
        q,
        {"W1": W1, "b1": b1, "W2": W2, "b2": b2},
        ln_scale,
        ln_bias,
        TTTMLPState,
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

    def step(s: TTTMLPState, xs):
        qc, kc, vc, ec = xs  # [B, H, C, D], eta [B, H, C]
        b1c = s.b1.astype(acc)[:, :, None, :]
        b2c = s.b2.astype(acc)[:, :, None, :]
        z1 = checkpoint_name(matmul("bhcd,bhdf->bhcf", kc, s.W1, cd) + b1c, "ttt_z")
        x2 = gelu_tanh(z1)
        z2 = matmul("bhcf,bhfd->bhcd", x2, s.W2, cd) + b2c
        target = vc.astype(acc) - kc.astype(acc)
        g2 = layer_norm_l2_grad(z2, target, ln_scale, ln_bias)
        g1 = matmul("bhcd,bhfd->bhcf", g2, s.W2, cd) * gelu_tanh_grad(z1)
        g1 = checkpoint_name(g1, "ttt_grad")
        e, e_last = lr_matrices(ec.astype(acc), token_scale)
        attn1 = e * (matmul("bhid,bhjd->bhij", qc, kc, cd) + 1.0)
        z1_bar = matmul("bhcd,bhdf->bhcf", qc, s.W1, cd) + b1c
        z1_bar = z1_bar - matmul("bhij,bhjf->bhif", attn1, g1, cd)
        x2_bar = gelu_tanh(z1_bar)
        attn2 = e * (matmul("bhif,bhjf->bhij", x2_bar, x2, cd) + 1.0)
        z2_bar = matmul("bhcf,bhfd->bhcd", x2_bar, s.W2, cd) + b2c
        z2_bar = checkpoint_name(z2_bar - matmul("bhij,bhjd->bhid", attn2, g2, cd), "ttt_z_bar")
        out = qc.astype(acc) + layer_norm(z2_bar, ln_s, ln_b, eps=LN_EPS)
        g1e, g2e = g1 * e_last[..., None], g2 * e_last[..., None]
        new = TTTMLPState(
            W1=(s.W1.astype(acc) - matmul("bhcd,bhcf->bhdf", kc, g1e, cd).astype(acc)).astype(
                state_dtype
            ),
            b1=(s.b1.astype(acc) - g1e.sum(2)).astype(state_dtype),
            W2=(s.W2.astype(acc) - matmul("bhcf,bhcd->bhfd", x2, g2e, cd).astype(acc)).astype(
                state_dtype
            ),
            b2=(s.b2.astype(acc) - g2e.sum(2)).astype(state_dtype),
        )
        return new, out

    def const_reads(qc, kw, vw, ew, band):  # reading W1..b2: queries [B, H, C, D], window 2C
        w1, w2 = W1.astype(state_dtype), W2.astype(state_dtype)
        b1c = b1.astype(state_dtype).astype(acc)[:, None]
        b2c = b2.astype(state_dtype).astype(acc)[:, None]
        z1 = matmul("bhcd,hdf->bhcf", kw, w1, cd) + b1c
        x2 = gelu_tanh(z1)
        z2 = matmul("bhcf,hfd->bhcd", x2, w2, cd) + b2c
        target = vw.astype(acc) - kw.astype(acc)
        g2 = layer_norm_l2_grad(z2, target, ln_scale, ln_bias)
        g1 = matmul("bhcd,hfd->bhcf", g2, w2, cd) * gelu_tanh_grad(z1)
        e = band_rates(ew.astype(acc), band)
        z1_bar = matmul("bhcd,hdf->bhcf", qc, w1, cd) + b1c
        x2_bar = gelu_tanh(z1_bar - band_dual(qc, kw, g1, e, cd))
        z2_bar = matmul("bhcf,hfd->bhcd", x2_bar, w2, cd) + b2c
        z2_bar = z2_bar - band_dual(x2_bar, x2, g2, e, cd)
        return qc.astype(acc) + layer_norm(z2_bar, ln_s, ln_b, eps=LN_EPS)

    if backend == "xla":
        return call.run(step, const_reads, q, k, v, eta)

    def kernel(q, k, v, eta, state, flags=None, reset=None):
        fields = lambda s: (s.W1, s.b1, s.W2, s.b2)  # noqa: E731
        o, *final = ttt_mlp_pallas(
            q,
            k,
            v,
            eta,
            fields(state),
            ln_scale,
            ln_bias,
            token_scale,
            mini_batch_size=mini_batch_size,
            checkpoint_group=checkpoint_group,
            interpret=backend == "pallas_interpret",
            segs=None if flags is None else (flags, fields(reset)),
        )
        return o, TTTMLPState(*final)

    if segment_ids is None:
        return kernel(q, k, v, eta, state)
    o, state = run_packed_kernel(
        kernel, const_reads, state, call.slow, q, k, v, eta, segment_ids,
        token_scale=token_scale, mini_batch_size=mini_batch_size,
    )  # fmt: skip
    return o.astype(q.dtype), state
