"""The TTT-MLP backward as one sequential Pallas (Triton backend) kernel per (sample, head).

Grid `(B, H)`. Each program walks the checkpoint groups in reverse. For a group it reloads the
fp32 state checkpoint, replays the group's state chain (inner model on the keys, `G2`, `G1`,
update: no output) and writes each mini-batch's starting state into a per-program HBM scratch
(`W1, W2` in the compute dtype, the only form the backward's matmuls read, plus fp32 biases);
then it runs the reverse chain over the group's mini-batches, recomputing that mini-batch's
forward tiles from its scratch state and applying the closed-form backward (`mlp_kernel.py`
derives it). The fp32 state cotangent `dW1, db1, dW2, db2` is carried across mini-batches as
loop carries ("registers") or in the `dW1_0, dW2_0` output buffers ("hbm", `Launch.state_in`;
the replay's fp32 state then lives in a per-program HBM buffer too); the sums for `ln_scale`,
`ln_bias` and `token_scale` stay on chip; `dq, dk, dv, deta` are written once per mini-batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttt_jax.ops.core.numerics import gelu_tanh_grad
from ttt_jax.ops.ttt import kernel_common as kc
from ttt_jax.ops.ttt import kernel_math as km
from ttt_jax.ops.ttt import mlp_kernel_math as mm
from ttt_jax.ops.ttt.kernel_common import pl
from ttt_jax.ops.ttt.mlp_kernel_fwd import MLPKernelConfig, load_state, maybe_reset, open_state


def _backward_kernel(*refs, cfg: MLPKernelConfig):
    q_ref, k_ref, v_ref, eta_ref, ts_ref, lnw_ref, lnb_ref = refs[:7]
    ck1_ref, ckb1_ref, ck2_ref, ckb2_ref = refs[7:11]
    do_ref, dw1f_ref, db1f_ref, dw2f_ref, db2f_ref = refs[11:16]
    refs = refs[16:]
    flags_ref = reset_refs = None
    if cfg.segmented:
        flags_ref, reset_refs, refs = refs[0], refs[1:5], refs[5:]
    dq_ref, dk_ref, dv_ref, deta_ref = refs[:4]
    dw10_ref, db10_ref, dw20_ref, db20_ref, dlnw_ref, dlnb_ref, dts_ref = refs[4:11]
    refs = refs[11:]
    dreset_refs = ()
    if cfg.segmented:
        dreset_refs, refs = refs[:4], refs[4:]
    sw1_ref, sb1_ref, sw2_ref, sb2_ref = refs[:4]
    rw_refs = tuple(refs[4:6])  # the replay's fp32 state ("hbm" only)
    b, h = pl.program_id(0), pl.program_id(1)
    c, d, cd, f32, nb = cfg.mini_batch, cfg.dim, cfg.cd, jnp.float32, cfg.n_blocks
    blk = cfg.block
    inputs = (q_ref, k_ref, v_ref, eta_ref)
    gamma, beta, a_causal, a_last = kc.head_params(lnw_ref, lnb_ref, ts_ref, h, c)

    for ref in dreset_refs:  # sums over this program's resets
        ref[b, h] = jnp.zeros(ref.shape[2:], ref.dtype)

    def replay(start):
        def body(j, carry):
            wcarry, b1s, b2 = carry
            i = start + j
            if cfg.segmented:
                wcarry, b1s, b2 = maybe_reset(
                    cfg, flags_ref, reset_refs, (wcarry, b1s, b2), rw_refs, b, h, i
                )
            state = open_state(cfg, wcarry, rw_refs, b, h)
            for n in range(nb):
                w1, w2 = state.get(n)
                sw1_ref[b, h, j, :, blk(n)] = w1.astype(sw1_ref.dtype)
                sw2_ref[b, h, j, blk(n), :] = w2.astype(sw2_ref.dtype)
                sb1_ref[b, h, j, blk(n)] = b1s[n]
            sb2_ref[b, h, j, :] = b2
            _, k, v, eta = kc.chunk_inputs(inputs, b, h, i, c)
            t = v.astype(f32) - k.astype(f32)

            def w(n):
                w1, w2 = state.get(n)
                return w1.astype(cd), w2.astype(cd)

            z1s, x2s, (g2, *_) = mm.pass_a(k, t, w, b1s, b2, gamma, beta, cd, nb)
            step = (jnp.where(kc.commits(cfg, flags_ref, b, i), a_last, 0.0) * eta)[:, None]
            g2e = g2 * step
            new_b1s = []
            for n in range(nb):
                w1, w2 = state.get(n)
                g1e = mm.hidden_grad(g2, z1s[n], w2.astype(cd), cd)[2] * step
                state.set(
                    n,
                    w1 - km.dot_wide(k, g1e, cd, ta=True),
                    w2 - km.dot_wide(x2s[n], g2e, cd, ta=True),
                )
                new_b1s.append(b1s[n] - jnp.sum(g1e, axis=0))
            state.sync()
            return state.carry(), tuple(new_b1s), b2 - jnp.sum(g2e, axis=0)

        return body

    def reverse(start, count):
        def body(jj, carry):
            dwcarry, db1s, db2, dgamma, dbeta, dts = carry
            dstate = open_state(cfg, dwcarry, (dw10_ref, dw20_ref), b, h)
            j = count - 1 - jj
            i = start + j

            def w(n):  # this mini-batch's starting state, compute dtype
                return sw1_ref[b, h, j, :, blk(n)], sw2_ref[b, h, j, blk(n), :]

            b1s = [sb1_ref[b, h, j, blk(n)] for n in range(nb)]
            b2 = sb2_ref[b, h, j, :]
            q, k, v, eta = kc.chunk_inputs(inputs, b, h, i, c)
            rows = pl.ds(i * c, c)
            dout = do_ref[b, rows, h, :].astype(f32)
            t = v.astype(f32) - k.astype(f32)
            full = kc.commits(cfg, flags_ref, b, i)
            scale = jnp.where(full, a_last, 0.0)
            s = (scale * eta)[:, None]
            # --- recompute this mini-batch's forward tiles from its starting state
            z1s, x2s, (g2, x, r, y, mxy) = mm.pass_a(k, t, w, b1s, b2, gamma, beta, cd, nb)
            e = a_causal * eta[None, :]
            qk1 = km.dot(q, k, cd, tb=True) + 1.0
            attn1 = e * qk1
            hs, gps, g1s, z1bs, x2bs = [], [], [], [], []
            s2 = jnp.zeros((c, c), f32)
            z2b = b2[None, :] + jnp.zeros((c, d), f32)
            p2 = db2[None, :] + jnp.zeros((c, d), f32)  # X2 dW2' + db2' (state after)
            for n in range(nb):
                w1c, w2c = w(n)
                hn, gp, g1 = mm.hidden_grad(g2, z1s[n], w2c, cd)
                z1b, x2b, s2_n, p_n = mm.read_block(q, attn1, g1, w1c, b1s[n], x2s[n], w2c, cd)
                s2, z2b = s2 + s2_n, z2b + p_n
                p2 = p2 + km.dot(x2s[n], dstate.get(n)[1], cd)
                for lst, val in zip(
                    (hs, gps, g1s, z1bs, x2bs), (hn, gp, g1, z1b, x2b), strict=True
                ):
                    lst.append(val)
            s2_1 = s2 + 1.0
            attn2 = e * s2_1
            z2b = z2b - km.dot(attn2, g2, cd)
            xb, rb = km.ln_stats(z2b)
            # --- output LayerNorm and residual
            dgamma += jnp.sum(dout * xb, axis=0)
            dbeta += jnp.sum(dout, axis=0)
            dz2b = km.ln_bwd(dout, xb, rb, gamma)
            dq = dout
            # --- Z2_bar = X2_bar W2 + b2 - attn2 G2, attn2 = E * (X2_bar X2^T + 1)
            da2 = -km.dot(dz2b, g2, cd, tb=True)
            dg2 = -km.dot(attn2, dz2b, cd, ta=True)
            de = da2 * s2_1
            ds2 = da2 * e
            # --- the update of layer 2: W2' = W2 - X2^T (s G2), b2' = b2 - sum s G2
            dg2 -= s * p2
            dsv = -jnp.sum(g2 * p2, axis=1)
            # --- per hidden block: X2_bar = gelu(Z1_bar), Z1_bar = q W1 + b1 - attn1 G1, the
            # update of layer 1, and G1 = (G2 W2^T) * gelu'(Z1)
            da1 = jnp.zeros((c, c), f32)
            dk = jnp.zeros((c, d), f32)
            dz1bs, dx2s, dz1s, dhs = [], [], [], []
            for n in range(nb):
                w1c, w2c = w(n)
                dw1, dw2 = dstate.get(n)
                dx2b = km.dot(dz2b, w2c, cd, tb=True) + km.dot(ds2, x2s[n], cd)
                dz1b = dx2b * gelu_tanh_grad(z1bs[n])
                dq += km.dot(dz1b, w1c, cd, tb=True)
                da1 -= km.dot(dz1b, g1s[n], cd, tb=True)
                p1 = km.dot(k, dw1, cd) + db1s[n][None, :]  # K dW1' + db1'
                dg1 = -km.dot(attn1, dz1b, cd, ta=True) - s * p1
                dsv -= jnp.sum(g1s[n] * p1, axis=1)
                dk -= km.dot(s * g1s[n], dw1, cd, tb=True)
                dx2 = km.dot(ds2, x2bs[n], cd, ta=True) - km.dot(s * g2, dw2, cd, tb=True)
                dh = dg1 * gps[n]
                # gelu'' enters here: G1 depends on Z1 through gelu'(Z1).
                dz1 = dg1 * hs[n] * mm.gelu_tanh_grad2(z1s[n])
                dg2 += km.dot(dh, w2c, cd)
                for lst, val in zip((dz1bs, dx2s, dz1s, dhs), (dz1b, dx2, dz1, dh), strict=True):
                    lst.append(val)
            # --- G2 = LN-L2 gradient of Z2 = X2 W2 + b2 against t = v - k
            dz2, dt, dgamma_rows, dbeta_rows = km.inner_grad_bwd(
                dg2, g2, x, r, y, mxy, t, gamma, beta
            )
            dgamma += jnp.sum(dgamma_rows, axis=0)
            dbeta += jnp.sum(dbeta_rows, axis=0)
            new_db1s = []
            for n in range(nb):
                w1c, w2c = w(n)
                dw1, dw2 = dstate.get(n)
                dx2 = dx2s[n] + km.dot(dz2, w2c, cd, tb=True)
                dz1 = dz1s[n] + dx2 * gps[n]  # X2 = gelu(Z1), Z1 = k W1 + b1
                dk += km.dot(dz1, w1c, cd, tb=True)
                # The state cotangent accumulates over the reverse chain: fp32-accurate products.
                dw1 = dw1 + km.dot_wide(q, dz1bs[n], cd, ta=True) + km.dot_wide(k, dz1, cd, ta=True)
                dw2 = (
                    dw2
                    + km.dot_wide(x2bs[n], dz2b, cd, ta=True)
                    + km.dot_wide(dhs[n], g2, cd, ta=True)
                    + km.dot_wide(x2s[n], dz2, cd, ta=True)
                )
                dstate.set(n, dw1, dw2)
                new_db1s.append(db1s[n] + jnp.sum(dz1bs[n], axis=0) + jnp.sum(dz1, axis=0))
            dstate.sync()
            db2 = db2 + jnp.sum(dz2b, axis=0) + jnp.sum(dz2, axis=0)
            # --- attn1 = E * (q k^T + 1); E[i, j] = token_scale[i] eta[j]; s = a_last eta
            dqk = da1 * e
            dq += km.dot(dqk, k, cd)
            dk += km.dot(dqk, q, cd, ta=True) - dt
            deta, dts = km.rate_grads(de + da1 * qk1, dsv, eta, a_causal, scale, full, dts)
            kc.store_input_grads((dq_ref, dk_ref, dv_ref, deta_ref), b, h, rows, (dq, dk, dt, deta))
            dwcarry, db1s = dstate.carry(), tuple(new_db1s)
            if cfg.segmented:
                dwcarry, db1s, db2 = collect_reset_grads(dstate, (dwcarry, db1s, db2), i)
            return dwcarry, db1s, db2, dgamma, dbeta, dts

        return body

    def collect_reset_grads(dstate, dcarry, i):
        # The backward of `maybe_reset`: where mini-batch i reset, the cotangent of its
        # starting state adds into the reset sums and the carried state before it gets none.
        dwcarry, db1s, db2 = dcarry
        reset = kc.resets(flags_ref, b, i)
        dr1, drb1, dr2, drb2 = dreset_refs

        @pl.when(reset)
        def _():
            for n in range(nb):
                dw1, dw2 = dstate.get(n)
                dr1[b, h, :, blk(n)] = dr1[b, h, :, blk(n)] + dw1
                dr2[b, h, blk(n), :] = dr2[b, h, blk(n), :] + dw2
                drb1[b, h, blk(n)] = drb1[b, h, blk(n)] + db1s[n]
            drb2[b, h, :] = drb2[b, h, :] + db2
            if cfg.state_in == "hbm":
                for n in range(nb):
                    dw1, dw2 = dstate.get(n)
                    dstate.set(n, jnp.zeros_like(dw1), jnp.zeros_like(dw2))
                dstate.sync()

        zero = lambda x: jnp.where(reset, jnp.zeros_like(x), x)  # noqa: E731
        return jax.tree.map(zero, dwcarry), jax.tree.map(zero, db1s), zero(db2)

    def checkpoint(grp):
        return (
            load_state(cfg, (ck1_ref, ck2_ref), rw_refs, b, h, (grp,)),
            tuple(ckb1_ref[b, h, grp, blk(n)] for n in range(nb)),
            ckb2_ref[b, h, grp, :],
        )

    dstate = (
        load_state(cfg, (dw1f_ref, dw2f_ref), (dw10_ref, dw20_ref), b, h),
        tuple(db1f_ref[b, h, blk(n)] for n in range(nb)),
        db2f_ref[b, h, :],
    )
    dwcarry, db1s, db2 = kc.reverse_groups(
        cfg, replay, reverse, checkpoint, dstate, (dlnw_ref, dlnb_ref, dts_ref), b, h
    )
    if cfg.state_in == "registers":
        for n in range(nb):
            dw10_ref[b, h, :, blk(n)] = dwcarry[0][n]
            dw20_ref[b, h, blk(n), :] = dwcarry[1][n]
    for n in range(nb):
        db10_ref[b, h, blk(n)] = db1s[n]
    db20_ref[b, h, :] = db2


def backward(cfg: MLPKernelConfig, q, k, v, eta, token_scale, ln_scale, ln_bias, ckpts, do,
             dstate, *, segs):  # fmt: skip
    """Runs the backward kernel.

    Args: the forward's inputs (as in `mlp_kernel_fwd.forward`), its four checkpoint arrays,
    and the cotangents `do [B, N C, H, D]` (dtype of q) and `dstate` (fp32, the state's four
    fields).

    Returns:
      `dq, dk, dv` (dtype of q), `deta [B, N C, H]`, the four initial-state cotangents (fp32),
      and the per-(b, h) partial sums `dln_scale, dln_bias [B, H, D]`, `dtoken_scale [B, H, C]`;
      with `segs` (as for the forward), also the per-sample cotangent of the reset state (its
      four fields, `[B, H, ...]` fp32).
    """
    bsz, _, heads, d = q.shape
    f, g = cfg.hidden, cfg.group
    f32 = jnp.float32
    sd = jax.ShapeDtypeStruct
    out_shape = kc.backward_out_shape(cfg, q, [(d, f), (f,), (f, d), (d,)])
    seg_args = ()
    if segs is not None:
        seg_args = (segs[0], *segs[1])
        out_shape += [sd((bsz, *r.shape), f32) for r in segs[1]]
    n_out = len(out_shape)
    # Scratch: the replayed states of one group (W1, W2 in the compute dtype) and their biases.
    out_shape += [
        sd((bsz, heads, g, d, f), q.dtype),
        sd((bsz, heads, g, f), f32),
        sd((bsz, heads, g, f, d), q.dtype),
        sd((bsz, heads, g, d), f32),
    ]
    if cfg.state_in == "hbm":  # the replay's fp32 W1, W2
        out_shape += [sd((bsz, heads, d, f), f32), sd((bsz, heads, f, d), f32)]
    kernel = kc.kernel_partial(_backward_kernel, cfg=cfg)
    args = (q, k, v, eta, token_scale, ln_scale, ln_bias, *ckpts, do, *dstate, *seg_args)
    outs = kc.call(kernel, cfg, out_shape, *args)[:n_out]
    if segs is None:
        return outs
    return (*outs[:-4], tuple(outs[-4:]))
