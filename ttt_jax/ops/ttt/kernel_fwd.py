"""The TTT-Linear forward as one sequential Pallas (Triton backend) kernel per (sample, head).

Grid `(B, H)`. Each program keeps its fp32 fast weight `W [D, D]` and bias `b [D]` on chip as
the `fori_loop` carry across all mini-batches; per mini-batch it loads `q, k, v [C, D]` and
`eta [C]`, computes `Z`, the LN-L2 gradient `G`, `Z_bar`, writes `o = q + LN(Z_bar)` and updates
`(W, b)`. It writes nothing else but the final state and, when asked (the custom VJP's forward),
the fp32 state at the start of every `group`-th mini-batch.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.ttt import kernel_common as kc
from ttt_jax.ops.ttt import kernel_math as km
from ttt_jax.ops.ttt.kernel_common import KernelConfig, pl


def _forward_kernel(*refs, cfg: KernelConfig, with_checkpoints: bool):
    q_ref, k_ref, v_ref, eta_ref, ts_ref, lnw_ref, lnb_ref, w0_ref, b0_ref = refs[:9]
    refs = refs[9:]
    flags_ref = reset_refs = None
    if cfg.segmented:
        flags_ref, *reset_refs = refs[:3]
        refs = refs[3:]
    o_ref, wf_ref, bf_ref = refs[:3]
    b, h = pl.program_id(0), pl.program_id(1)
    c, cd = cfg.mini_batch, cfg.cd
    gamma, beta, a_causal, a_last = kc.head_params(lnw_ref, lnb_ref, ts_ref, h, c)

    def body(i, carry):
        w, bias = carry
        if with_checkpoints:
            ckw_ref, ckb_ref = refs[3:5]

            # lax.rem / lax.div: jnp's floor-mod lowers to mixed i32/i1 Triton ops (i >= 0).
            @pl.when(lax.rem(i, cfg.group) == 0)
            def _():
                ckw_ref[b, h, lax.div(i, cfg.group), :, :] = w
                ckb_ref[b, h, lax.div(i, cfg.group), :] = bias

        if cfg.segmented:  # after the checkpoint: the backward's replay resets as this does
            w, bias = kc.maybe_reset(flags_ref, reset_refs, (w, bias), b, h, i)
        q, k, v, eta = kc.chunk_inputs((q_ref, k_ref, v_ref, eta_ref), b, h, i, c)
        wc = w.astype(cd)
        z = km.dot(k, wc, cd) + bias[None, :]
        g = km.inner_grad(z, v.astype(jnp.float32) - k.astype(jnp.float32), gamma, beta)[0]
        # E[i, j] = token_scale[i] eta[j] (j <= i); the +1 is the bias's share of the step.
        attn = a_causal * eta[None, :] * (km.dot(q, k, cd, tb=True) + 1.0)
        z_bar = km.dot(q, wc, cd) + bias[None, :] - km.dot(attn, g, cd)
        xb, _ = km.ln_stats(z_bar)
        o_ref[b, pl.ds(i * c, c), h, :] = (q.astype(jnp.float32) + xb * gamma + beta).astype(
            o_ref.dtype
        )
        # A trailing partial mini-batch (or a tail of a packed document) is read but does not
        # update the state.
        step = jnp.where(kc.commits(cfg, flags_ref, b, i), a_last, 0.0) * eta
        ge = g * step[:, None]
        return w - km.dot(k, ge, cd, ta=True), bias - jnp.sum(ge, axis=0)

    w, bias = lax.fori_loop(0, cfg.n_chunks, body, (w0_ref[b, h, :, :], b0_ref[b, h, :]))
    wf_ref[b, h, :, :] = w
    bf_ref[b, h, :] = bias


def forward(cfg: KernelConfig, q, k, v, eta, token_scale, ln_scale, ln_bias, state, *, segs,
            with_checkpoints: bool):  # fmt: skip
    """Runs the forward kernel.

    Args:
      q, k, v: `[B, N C, H, D]` in the compute dtype; eta: `[B, N C, H]`.
      token_scale: `[C]`, ln_scale, ln_bias: `[H, D]`, all fp32.
      state: `(W [B, H, D, D], b [B, H, D])` fp32 initial state.
      segs: None, or with `cfg.segmented` `(flags [B, N] int32, (W [H, D, D], b [H, D]))`, the
        per-mini-batch `RESET` / `COMMIT` bits and the fp32 state a reset restarts from.

    Returns:
      `(o [B, N C, H, D], W [B, H, D, D], b [B, H, D])`, plus the checkpoints
      `[B, H, n_groups, D, D]` and `[B, H, n_groups, D]` with `with_checkpoints`.
    """
    d = cfg.dim
    out_shape = kc.forward_out_shape(cfg, q, [(d, d), (d,)], with_checkpoints)
    kernel = kc.kernel_partial(_forward_kernel, cfg=cfg, with_checkpoints=with_checkpoints)
    seg_args = () if segs is None else (segs[0], *segs[1])
    return kc.call(
        kernel, cfg, out_shape, q, k, v, eta, token_scale, ln_scale, ln_bias, *state, *seg_args
    )
