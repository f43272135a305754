"""The TTT-MLP forward as one sequential Pallas (Triton backend) kernel per (sample, head).

Grid `(B, H)`. Each program walks the mini-batches in order with the fp32 state `W1 [D, F]`,
`b1 [F]`, `W2 [F, D]`, `b2 [D]`; per mini-batch it loads `q, k, v [C, D]` and `eta [C]`, runs
the inner model on the keys (`Z1, X2, Z2`), its LN-L2 gradient `G2` and the hidden gradient
`G1`, reads the queries in dual form (`Z1_bar, X2_bar, Z2_bar`), writes `o = q + LN(Z2_bar)` and
updates the state. It writes nothing else but the final state and, when asked (the custom VJP's
forward), the fp32 state at the start of every `group`-th mini-batch.

Where the 128 KiB (D=64) of fp32 `W1, W2` live between mini-batches is a knob
(`Launch.state_in`): "registers" keeps them as `fori_loop` carries (Triton allocates them to
registers and spills what does not fit, so more warps mean more room); "hbm" keeps them in the
final-state output buffer itself, a per-program HBM region that stays L2-resident, read one
hidden block at a time (`Launch.hidden_block`) and written back after each update, with CTA
barriers ordering the accesses. The biases are loop carries either way.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.ttt import kernel_common as kc
from ttt_jax.ops.ttt import kernel_math as km
from ttt_jax.ops.ttt import mlp_kernel_math as mm
from ttt_jax.ops.ttt.kernel_common import KernelConfig, pl

STATE_IN = ("registers", "hbm")


@dataclasses.dataclass(frozen=True)
class Launch:
    """Launch and layout knobs of one kernel (forward or backward), for tuning on the GPU.

    Attributes:
      num_warps, num_stages: Triton launch parameters (None: `mlp_kernel.launch_defaults`).
      hidden_block: BF, hidden units per block of the inner loops (a power of two >= 16 that
        divides F; None: F, one block).
      state_in: where the fp32 `W1, W2` (forward, backward replay) and their cotangents
        (backward) live across mini-batches: "registers" (loop carries) or "hbm" (a
        per-program HBM buffer, L2-resident, read block by block).
    """

    num_warps: int | None = None
    num_stages: int | None = None
    hidden_block: int | None = None
    state_in: str = "registers"

    def __post_init__(self):
        for name in ("num_warps", "num_stages", "hidden_block"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Launch.{name}={value!r} must be a positive int or None")
        if self.num_warps is not None and self.num_warps & (self.num_warps - 1):
            raise ValueError(f"Launch.num_warps={self.num_warps} must be a power of two")
        if self.state_in not in STATE_IN:
            raise ValueError(f"Launch.state_in={self.state_in!r} is not one of {STATE_IN}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPKernelConfig(KernelConfig):
    """`KernelConfig` (the facts both TTT kernels share) with the TTT-MLP kernel's own.

    Attributes:
      hidden: F.
      num_warps, num_stages (`KernelConfig`'s), hidden_block, state_in: as `Launch`, resolved.
    """

    hidden: int
    hidden_block: int
    state_in: str

    @property
    def n_blocks(self) -> int:
        return self.hidden // self.hidden_block

    def block(self, j: int):
        return pl.ds(j * self.hidden_block, self.hidden_block)


class RegisterState:
    """fp32 `W1, W2` blocks held as loop-carry values."""

    def __init__(self, cfg: MLPKernelConfig, carry):
        self.w1, self.w2 = (list(x) for x in carry)

    def get(self, j):
        return self.w1[j], self.w2[j]

    def set(self, j, w1, w2):
        self.w1[j], self.w2[j] = w1, w2

    def sync(self):
        pass

    def carry(self):
        return tuple(self.w1), tuple(self.w2)


class HbmState:
    """fp32 `W1, W2` in per-program HBM refs `[B, H, D, F]`, `[B, H, F, D]`, block by block.

    `set` waits for every thread's earlier reads of the block before writing it; `sync` makes
    the writes visible to every thread before the next reads.
    """

    def __init__(self, cfg: MLPKernelConfig, w1_ref, w2_ref, b, h):
        self.cfg, self.w1_ref, self.w2_ref, self.b, self.h = cfg, w1_ref, w2_ref, b, h

    def get(self, j):
        blk = self.cfg.block(j)
        return self.w1_ref[self.b, self.h, :, blk], self.w2_ref[self.b, self.h, blk, :]

    def set(self, j, w1, w2):
        kc.barrier(self.cfg)
        blk = self.cfg.block(j)
        self.w1_ref[self.b, self.h, :, blk] = w1
        self.w2_ref[self.b, self.h, blk, :] = w2

    def sync(self):
        kc.barrier(self.cfg)

    def carry(self):
        return ()


def open_state(cfg: MLPKernelConfig, carry, refs, b, h):
    """The state store of one loop step: `RegisterState` on `carry`, or `HbmState` on `refs`."""
    if cfg.state_in == "registers":
        return RegisterState(cfg, carry)
    return HbmState(cfg, *refs, b, h)


def load_state(cfg: MLPKernelConfig, src, dst, b, h, src_index=(), at=None):
    """The initial carry of a state store: the blocks of `src = (W1 ref, W2 ref)` at
    `[b, h, *src_index]` (or at the index tuple `at`) as values ("registers"), or copied into
    `dst` refs ("hbm": `()`)."""
    w1_ref, w2_ref = src
    at = (b, h, *src_index) if at is None else at
    blocks = [
        (w1_ref[(*at, slice(None), cfg.block(j))], w2_ref[(*at, cfg.block(j), slice(None))])
        for j in range(cfg.n_blocks)
    ]
    if cfg.state_in == "registers":
        return tuple(w for w, _ in blocks), tuple(w for _, w in blocks)
    store = HbmState(cfg, *dst, b, h)
    for j, (w1, w2) in enumerate(blocks):
        store.set(j, w1, w2)
    store.sync()
    return ()


def maybe_reset(cfg: MLPKernelConfig, flags_ref, reset_refs, carry, hbm_refs, b, h, i):
    """The state mini-batch `i` starts from (packed documents): head `h`'s reset state
    (`reset_refs = (W1 [H, D, F], b1 [H, F], W2 [H, F, D], b2 [H, D])`) where it is flagged
    `RESET`, else the carried one. `carry = (wcarry, b1s, b2)` as the loops carry it; with
    "hbm" state the reset is copied into `hbm_refs` (the store's W1, W2 refs)."""
    r1, rb1, r2, rb2 = reset_refs
    wcarry, b1s, b2 = carry
    reset = kc.resets(flags_ref, b, i)

    def fresh_biases():
        return tuple(rb1[h, cfg.block(j)] for j in range(cfg.n_blocks)), rb2[h, :]

    if cfg.state_in == "registers":
        return lax.cond(
            reset,
            lambda: (load_state(cfg, (r1, r2), (), b, h, at=(h,)), *fresh_biases()),
            lambda: (wcarry, b1s, b2),
        )

    @pl.when(reset)
    def _():
        load_state(cfg, (r1, r2), hbm_refs, b, h, at=(h,))

    return (), *lax.cond(reset, fresh_biases, lambda: (b1s, b2))


def _forward_kernel(*refs, cfg: MLPKernelConfig, with_checkpoints: bool):
    q_ref, k_ref, v_ref, eta_ref, ts_ref, lnw_ref, lnb_ref = refs[:7]
    w10_ref, b10_ref, w20_ref, b20_ref = refs[7:11]
    refs = refs[11:]
    flags_ref = reset_refs = None
    if cfg.segmented:
        flags_ref, reset_refs, refs = refs[0], refs[1:5], refs[5:]
    o_ref, w1f_ref, b1f_ref, w2f_ref, b2f_ref = refs[:5]
    b, h = pl.program_id(0), pl.program_id(1)
    c, cd, f32, nb = cfg.mini_batch, cfg.cd, jnp.float32, cfg.n_blocks
    gamma, beta, a_causal, a_last = kc.head_params(lnw_ref, lnb_ref, ts_ref, h, c)

    def body(i, carry):
        wcarry, b1s, b2 = carry
        state = open_state(cfg, wcarry, (w1f_ref, w2f_ref), b, h)
        if with_checkpoints:
            ck1_ref, ckb1_ref, ck2_ref, ckb2_ref = refs[5:9]

            # lax.rem / lax.div: jnp's floor-mod lowers to mixed i32/i1 Triton ops (i >= 0).
            @pl.when(lax.rem(i, cfg.group) == 0)
            def _():
                g = lax.div(i, cfg.group)
                for j in range(nb):
                    w1, w2 = state.get(j)
                    ck1_ref[b, h, g, :, cfg.block(j)] = w1
                    ck2_ref[b, h, g, cfg.block(j), :] = w2
                    ckb1_ref[b, h, g, cfg.block(j)] = b1s[j]
                ckb2_ref[b, h, g, :] = b2

        if cfg.segmented:  # after the checkpoint: the backward's replay resets as this does
            carry = (wcarry, b1s, b2)
            wcarry, b1s, b2 = maybe_reset(
                cfg, flags_ref, reset_refs, carry, (w1f_ref, w2f_ref), b, h, i
            )
            state = open_state(cfg, wcarry, (w1f_ref, w2f_ref), b, h)
        q, k, v, eta = kc.chunk_inputs((q_ref, k_ref, v_ref, eta_ref), b, h, i, c)
        t = v.astype(f32) - k.astype(f32)

        def w(j):
            w1, w2 = state.get(j)
            return w1.astype(cd), w2.astype(cd)

        z1s, x2s, (g2, *_) = mm.pass_a(k, t, w, b1s, b2, gamma, beta, cd, nb)
        e = a_causal * eta[None, :]
        attn1 = e * (km.dot(q, k, cd, tb=True) + 1.0)
        # A trailing partial mini-batch (or a packed document's tail) is read but does not
        # update the state.
        step = jnp.where(kc.commits(cfg, flags_ref, b, i), a_last, 0.0) * eta
        g2e = g2 * step[:, None]
        s2 = jnp.zeros((c, c), f32)
        z2b = b2[None, :] + jnp.zeros((c, cfg.dim), f32)
        new_b1s = []
        for j in range(nb):
            w1, w2 = state.get(j)
            w1c, w2c = w1.astype(cd), w2.astype(cd)
            _, _, g1 = mm.hidden_grad(g2, z1s[j], w2c, cd)
            _, _, s2_j, p_j = mm.read_block(q, attn1, g1, w1c, b1s[j], x2s[j], w2c, cd)
            s2, z2b = s2 + s2_j, z2b + p_j
            g1e = g1 * step[:, None]
            state.set(
                j,
                w1 - km.dot_wide(k, g1e, cd, ta=True),
                w2 - km.dot_wide(x2s[j], g2e, cd, ta=True),
            )
            new_b1s.append(b1s[j] - jnp.sum(g1e, axis=0))
        state.sync()
        z2b = z2b - km.dot(e * (s2 + 1.0), g2, cd)
        xb, _ = km.ln_stats(z2b)
        o_ref[b, pl.ds(i * c, c), h, :] = (q.astype(f32) + xb * gamma + beta).astype(o_ref.dtype)
        return state.carry(), tuple(new_b1s), b2 - jnp.sum(g2e, axis=0)

    init = (
        load_state(cfg, (w10_ref, w20_ref), (w1f_ref, w2f_ref), b, h),
        tuple(b10_ref[b, h, cfg.block(j)] for j in range(nb)),
        b20_ref[b, h, :],
    )
    wcarry, b1s, b2 = lax.fori_loop(0, cfg.n_chunks, body, init)
    if cfg.state_in == "registers":
        for j in range(nb):
            w1f_ref[b, h, :, cfg.block(j)] = wcarry[0][j]
            w2f_ref[b, h, cfg.block(j), :] = wcarry[1][j]
    for j in range(nb):
        b1f_ref[b, h, cfg.block(j)] = b1s[j]
    b2f_ref[b, h, :] = b2


def forward(cfg: MLPKernelConfig, q, k, v, eta, token_scale, ln_scale, ln_bias, state, *,
            segs, with_checkpoints: bool):  # fmt: skip
    """Runs the forward kernel.

    Args:
      q, k, v: `[B, N C, H, D]` in the compute dtype; eta: `[B, N C, H]` fp32.
      token_scale: `[C]`, ln_scale, ln_bias: `[H, D]`, all fp32.
      state: `(W1 [B, H, D, F], b1 [B, H, F], W2 [B, H, F, D], b2 [B, H, D])` fp32.
      segs: None, or with `cfg.segmented` `(flags [B, N] int32, (W1 [H, D, F], b1 [H, F], W2
        [H, F, D], b2 [H, D]))`, the per-mini-batch `RESET` / `COMMIT` bits and the fp32 state
        a reset restarts from.

    Returns:
      `(o [B, N C, H, D], W1, b1, W2, b2)` (final state), plus the checkpoints
      `[B, H, n_groups, ...]` of each state field with `with_checkpoints`.
    """
    d, f = cfg.dim, cfg.hidden
    out_shape = kc.forward_out_shape(cfg, q, [(d, f), (f,), (f, d), (d,)], with_checkpoints)
    kernel = kc.kernel_partial(_forward_kernel, cfg=cfg, with_checkpoints=with_checkpoints)
    seg_args = () if segs is None else (segs[0], *segs[1])
    args = (q, k, v, eta, token_scale, ln_scale, ln_bias, *state, *seg_args)
    return kc.call(kernel, cfg, out_shape, *args)
