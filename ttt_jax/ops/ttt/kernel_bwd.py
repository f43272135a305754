"""The TTT-Linear backward as one sequential Pallas (Triton backend) kernel per (sample, head).

Grid `(B, H)`. Each program walks the checkpoint groups in reverse. For a group it reloads the
fp32 state checkpoint, replays the group's state chain (`Z`, `G`, update: no output) and writes
each mini-batch's starting state into a small per-program HBM scratch (`[G, D, D]` in the compute
dtype, the only form the backward's matmuls read, plus `[G, D]` fp32 biases); then it runs the
reverse chain over the group's mini-batches, recomputing that mini-batch's forward tiles from its
scratch state and applying the closed-form backward (`kernel_math`). The cotangent of the state,
`dW [D, D]` and `db [D]` fp32, and the sums for `ln_scale`, `ln_bias` and `token_scale` stay on
chip as loop carries; `dq, dk, dv, deta` are written once per mini-batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttt_jax.ops.ttt import kernel_common as kc
from ttt_jax.ops.ttt import kernel_math as km
from ttt_jax.ops.ttt.kernel_common import KernelConfig, pl


def _backward_kernel(*refs, cfg: KernelConfig):
    (q_ref, k_ref, v_ref, eta_ref, ts_ref, lnw_ref, lnb_ref, ckw_ref, ckb_ref, do_ref, dwf_ref,
     dbf_ref) = refs[:12]  # fmt: skip
    refs = refs[12:]
    flags_ref = reset_refs = None
    if cfg.segmented:
        flags_ref, *reset_refs = refs[:3]
        refs = refs[3:]
    dq_ref, dk_ref, dv_ref, deta_ref, dw0_ref, db0_ref, dlnw_ref, dlnb_ref, dts_ref = refs[:9]
    refs = refs[9:]
    dreset_refs = ()
    if cfg.segmented:
        dreset_refs, refs = refs[:2], refs[2:]
    sw_ref, sb_ref = refs
    b, h = pl.program_id(0), pl.program_id(1)
    c, cd, f32 = cfg.mini_batch, cfg.cd, jnp.float32
    inputs = (q_ref, k_ref, v_ref, eta_ref)
    gamma, beta, a_causal, a_last = kc.head_params(lnw_ref, lnb_ref, ts_ref, h, c)

    for ref in dreset_refs:  # sums over this program's resets
        ref[b, h] = jnp.zeros(ref.shape[2:], ref.dtype)

    def replay(start):
        def body(j, carry):
            w, bias = carry
            i = start + j
            if cfg.segmented:
                w, bias = kc.maybe_reset(flags_ref, reset_refs, (w, bias), b, h, i)
            sw_ref[b, h, j, :, :] = w.astype(sw_ref.dtype)
            sb_ref[b, h, j, :] = bias
            _, k, v, eta = kc.chunk_inputs(inputs, b, h, i, c)
            z = km.dot(k, w, cd) + bias[None, :]
            g = km.inner_grad(z, v.astype(f32) - k.astype(f32), gamma, beta)[0]
            ge = g * (jnp.where(kc.commits(cfg, flags_ref, b, i), a_last, 0.0) * eta)[:, None]
            return w - km.dot(k, ge, cd, ta=True), bias - jnp.sum(ge, axis=0)

        return body

    def reverse(start, count):
        def body(jj, carry):
            dw, db, dgamma, dbeta, dts = carry
            j = count - 1 - jj
            i = start + j
            wc = sw_ref[b, h, j, :, :]
            bias = sb_ref[b, h, j, :][None, :]
            q, k, v, eta = kc.chunk_inputs(inputs, b, h, i, c)
            rows = pl.ds(i * c, c)
            dout = do_ref[b, rows, h, :].astype(f32)
            t = v.astype(f32) - k.astype(f32)
            # --- recompute this mini-batch's forward tiles from its starting state
            z = km.dot(k, wc, cd) + bias
            g, x, r, y, mxy = km.inner_grad(z, t, gamma, beta)
            e = a_causal * eta[None, :]
            qk1 = km.dot(q, k, cd, tb=True) + 1.0
            attn = e * qk1
            z_bar = km.dot(q, wc, cd) + bias - km.dot(attn, g, cd)
            xb, rb = km.ln_stats(z_bar)
            # --- output LayerNorm and residual
            dgamma += jnp.sum(dout * xb, axis=0)
            dbeta += jnp.sum(dout, axis=0)
            dzb = km.ln_bwd(dout, xb, rb, gamma)
            # --- Z_bar = q W + b - attn G
            dq = dout + km.dot(dzb, wc, cd, tb=True)
            da_mat = -km.dot(dzb, g, cd, tb=True)
            dg = -km.dot(attn, dzb, cd, ta=True)
            # --- the update W' = W - k^T (s G), b' = b - sum s G, s = token_scale[-1] eta
            full = kc.commits(cfg, flags_ref, b, i)
            scale = jnp.where(full, a_last, 0.0)
            s = scale * eta
            p = km.dot(k, dw, cd) + db[None, :]
            dg -= s[:, None] * p
            ds = -jnp.sum(g * p, axis=1)
            dk = -km.dot(s[:, None] * g, dw, cd, tb=True)
            # --- attn = E * (q k^T + 1), E[i, j] = token_scale[i] eta[j]
            dqk = da_mat * e
            dq += km.dot(dqk, k, cd)
            dk += km.dot(dqk, q, cd, ta=True)
            deta, dts = km.rate_grads(da_mat * qk1, ds, eta, a_causal, scale, full, dts)
            # --- G = LN-L2 gradient of Z = k W + b against t = v - k
            dz, dt, dgamma_rows, dbeta_rows = km.inner_grad_bwd(dg, g, x, r, y, mxy, t, gamma, beta)
            dgamma += jnp.sum(dgamma_rows, axis=0)
            dbeta += jnp.sum(dbeta_rows, axis=0)
            dk += km.dot(dz, wc, cd, tb=True) - dt
            kc.store_input_grads((dq_ref, dk_ref, dv_ref, deta_ref), b, h, rows, (dq, dk, dt, deta))
            dw = dw + km.dot(q, dzb, cd, ta=True) + km.dot(k, dz, cd, ta=True)
            db = db + jnp.sum(dzb, axis=0) + jnp.sum(dz, axis=0)
            if cfg.segmented:
                dw, db = kc.collect_reset_grads(flags_ref, dreset_refs, (dw, db), b, h, i)
            return dw, db, dgamma, dbeta, dts

        return body

    def checkpoint(grp):
        return ckw_ref[b, h, grp, :, :], ckb_ref[b, h, grp, :]

    dstate = (dwf_ref[b, h, :, :], dbf_ref[b, h, :])
    dw, db = kc.reverse_groups(
        cfg, replay, reverse, checkpoint, dstate, (dlnw_ref, dlnb_ref, dts_ref), b, h
    )
    dw0_ref[b, h, :, :] = dw
    db0_ref[b, h, :] = db


def backward(cfg: KernelConfig, q, k, v, eta, token_scale, ln_scale, ln_bias, ckpts, do,
             dstate, *, segs):  # fmt: skip
    """Runs the backward kernel.

    Args: the forward's inputs (as in `kernel_fwd.forward`, `segs` included), its checkpoints
    `(ckW, ckb)`, and the cotangents `do [B, N C, H, D]` (dtype of q) and `dstate = (dW [B, H,
    D, D], db [B, H, D])` (fp32).

    Returns:
      `dq, dk, dv` (dtype of q), `deta [B, N C, H]`, `dW0 [B, H, D, D]`, `db0 [B, H, D]` (fp32),
      and the per-(b, h) partial sums `dln_scale, dln_bias [B, H, D]`, `dtoken_scale [B, H, C]`;
      with `segs`, also the per-sample cotangent of the reset state `(dW [B, H, D, D], db [B,
      H, D])`.
    """
    bsz, _, heads, d = q.shape
    out_shape = kc.backward_out_shape(cfg, q, [(d, d), (d,)])
    seg_args = ()
    if segs is not None:
        seg_args = (segs[0], *segs[1])
        out_shape += [jax.ShapeDtypeStruct((bsz, *r.shape), jnp.float32) for r in segs[1]]
    n_out = len(out_shape)
    # Scratch: the replayed states of one group (compute dtype) and their biases.
    out_shape += [
        jax.ShapeDtypeStruct((bsz, heads, cfg.group, d, d), q.dtype),
        jax.ShapeDtypeStruct((bsz, heads, cfg.group, d), jnp.float32),
    ]
    kernel = kc.kernel_partial(_backward_kernel, cfg=cfg)
    args = (q, k, v, eta, token_scale, ln_scale, ln_bias, *ckpts, do, *dstate, *seg_args)
    outs = kc.call(kernel, cfg, out_shape, *args)[:n_out]
    if segs is None:
        return outs
    return (*outs[:-2], tuple(outs[-2:]))
