"""The TTT-Linear forward as one sequential Pallas (Triton backend) kernel per (sample, head).

Grid `(B, H)`. Each program keeps its fp32 fast weight `W [D, D]` and bias `b [D]` on chip as
the `fori_loop` carry across all mini-batches; per mini-batch it loads `q, k, v [C, D]` and
`eta [C]`, computes `Z`, the LN-L2 gradient `G`, `Z_bar`, writes `o = q + LN(Z_bar)` and updates
`(W, b)`. It writes nothing else but the final state and, when asked (the custom VJP's forward),
the fp32 state at the start of every `group`-th mini-batch.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.ttt import kernel_math as km

with warnings.catch_warnings():
    # The Triton backend is deprecated from jax 0.11 on; it is the one that runs at C = 16.
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static shape and launch facts of one kernel call (hashable: a `custom_vjp` nondiff arg).

    Attributes:
      batch, heads, dim: B, H, D.
      mini_batch: C.
      n_chunks: mini-batches in the (padded) sequence, `ceil(T / C)`.
      n_full: complete mini-batches (`n_chunks` or `n_chunks - 1`); the rest only read.
      group: state checkpoints every `group` mini-batches.
      compute_dtype: dtype name of q, k, v (the MMA operand dtype).
      interpret: run the kernels under the Pallas interpreter (CPU tests).
      num_warps, num_stages: Triton launch parameters.
      poison: start every output buffer as NaN (GPU tests: an element the kernel fails to
        write shows up as NaN instead of stale memory).
    """

    batch: int
    heads: int
    dim: int
    mini_batch: int
    n_chunks: int
    n_full: int
    group: int
    compute_dtype: str
    interpret: bool
    num_warps: int
    num_stages: int
    poison: bool = False

    @property
    def n_groups(self) -> int:
        return -(-self.n_chunks // self.group)

    @property
    def cd(self):
        return jnp.dtype(self.compute_dtype)

    def compiler_params(self):
        return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def call(kernel, cfg: KernelConfig, out_shape, *args):
    """`pl.pallas_call` over the `(B, H)` grid with whole-array refs (the kernels index them)."""
    aliases = {}
    if cfg.poison:
        # NaN-filled buffers aliased to the outputs; the kernel ignores their input refs.
        n_in, inner = len(args), kernel
        args = (*args, *(jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape))
        aliases = {n_in + j: j for j in range(len(out_shape))}

        def kernel(*refs):
            return inner(*refs[:n_in], *refs[n_in + len(out_shape) :])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(cfg.batch, cfg.heads),
            input_output_aliases=aliases,
            compiler_params=None if cfg.interpret else cfg.compiler_params(),
            interpret=cfg.interpret,
        )(*args)


def chunk_inputs(refs, b, h, i, c):
    """Loads mini-batch `i` of sample `b`, head `h`: `q, k, v [C, D]`, `eta [C]` fp32."""
    q_ref, k_ref, v_ref, eta_ref = refs
    rows = pl.ds(i * c, c)
    return (
        q_ref[b, rows, h, :],
        k_ref[b, rows, h, :],
        v_ref[b, rows, h, :],
        eta_ref[b, rows, h].astype(jnp.float32),
    )


def _forward_kernel(*refs, cfg: KernelConfig, with_checkpoints: bool):
    q_ref, k_ref, v_ref, eta_ref, ts_ref, lnw_ref, lnb_ref, w0_ref, b0_ref = refs[:9]
    o_ref, wf_ref, bf_ref = refs[9:12]
    b, h = pl.program_id(0), pl.program_id(1)
    c, cd = cfg.mini_batch, cfg.cd
    gamma = lnw_ref[h, :][None, :]
    beta = lnb_ref[h, :][None, :]
    a = ts_ref[:]
    a_last = ts_ref[c - 1]
    a_causal = jnp.where(km.causal(c), a[:, None], 0.0)

    def body(i, carry):
        w, bias = carry
        if with_checkpoints:
            ckw_ref, ckb_ref = refs[12:14]

            # lax.rem / lax.div: jnp's floor-mod lowers to mixed i32/i1 Triton ops (i >= 0).
            @pl.when(lax.rem(i, cfg.group) == 0)
            def _():
                ckw_ref[b, h, lax.div(i, cfg.group), :, :] = w
                ckb_ref[b, h, lax.div(i, cfg.group), :] = bias

        q, k, v, eta = chunk_inputs((q_ref, k_ref, v_ref, eta_ref), b, h, i, c)
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
        # A trailing partial mini-batch is read but does not update the state.
        step = jnp.where(i < cfg.n_full, a_last, 0.0) * eta
        ge = g * step[:, None]
        return w - km.dot(k, ge, cd, ta=True), bias - jnp.sum(ge, axis=0)

    w, bias = lax.fori_loop(0, cfg.n_chunks, body, (w0_ref[b, h, :, :], b0_ref[b, h, :]))
    wf_ref[b, h, :, :] = w
    bf_ref[b, h, :] = bias


def forward(
    cfg: KernelConfig,
    q,
    k,
    v,
    eta,
    token_scale,
    ln_scale,
    ln_bias,
    w0,
    b0,
    *,
    with_checkpoints: bool,
):
    """Runs the forward kernel.

    Args:
      q, k, v: `[B, N C, H, D]` in the compute dtype; eta: `[B, N C, H]`.
      token_scale: `[C]`, ln_scale, ln_bias: `[H, D]`, all fp32.
      w0, b0: `[B, H, D, D]`, `[B, H, D]` fp32 initial state.

    Returns:
      `(o [B, N C, H, D], W [B, H, D, D], b [B, H, D])`, plus the checkpoints
      `[B, H, n_groups, D, D]` and `[B, H, n_groups, D]` with `with_checkpoints`.
    """
    bsz, t, heads, d = q.shape
    f32 = jnp.float32
    out_shape = [
        jax.ShapeDtypeStruct((bsz, t, heads, d), q.dtype),
        jax.ShapeDtypeStruct((bsz, heads, d, d), f32),
        jax.ShapeDtypeStruct((bsz, heads, d), f32),
    ]
    if with_checkpoints:
        out_shape += [
            jax.ShapeDtypeStruct((bsz, heads, cfg.n_groups, d, d), f32),
            jax.ShapeDtypeStruct((bsz, heads, cfg.n_groups, d), f32),
        ]
    kernel = kernel_partial(_forward_kernel, cfg=cfg, with_checkpoints=with_checkpoints)
    return call(kernel, cfg, out_shape, q, k, v, eta, token_scale, ln_scale, ln_bias, w0, b0)


def kernel_partial(fn, **kw):
    def kernel(*refs):
        return fn(*refs, **kw)

    kernel.__name__ = fn.__name__.lstrip("_")
    return kernel
