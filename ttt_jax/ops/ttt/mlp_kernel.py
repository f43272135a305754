"""TTT-MLP through fused Pallas kernels (Triton backend) with a manual backward.

The same function as the XLA op in `mlp.py` (inner model `gelu_tanh(x W1 + b1) W2 + b2`, per-token
`eta`, `token_scale`, per-head LayerNorm, output `q + LN(Z2_bar)`, `initial_state` / final
state, any T with a trailing partial mini-batch read but not updating the state, fp32 state
under bf16 inputs), computed by two sequential kernels with one program per (sample, head)
(`mlp_kernel_fwd.py`, `mlp_kernel_bwd.py`), wrapped in a `jax.custom_vjp` (the harness both TTT
kernels share: `kernel_common.py`). Packed documents (`segment_ids`) run as on the TTT-Linear
kernel (`linear_kernel.py`): the flattened slot scan of `packed.kernel_layout`, `2 N + 1`
mini-batches with per-mini-batch `RESET` / `COMMIT` bits, the reset a `lax.cond` on the
register state or a copy into the "hbm" state (`mlp_kernel_fwd.maybe_reset`), short documents
read in XLA; `impl="auto"` keeps packed calls on XLA until that path passes the GPU check.

Forward of one mini-batch (dual form, every gradient at the start state `W1, b1, W2, b2`;
`E[i, j] = a_i eta_j` for `j <= i` with `a = token_scale`, `s_j = a_{C-1} eta_j` (0 for the
trailing partial mini-batch), `t = v - k`):

    Z1 = k W1 + b1,  X2 = gelu(Z1),  Z2 = X2 W2 + b2
    G2 = LN-L2 grad of Z2 against t                        (kernel_math.inner_grad)
    H = G2 W2^T,     G1 = H * gelu'(Z1)
    A1 = E * (q k^T + 1),        Z1b = q W1 + b1 - A1 G1,   X2b = gelu(Z1b)
    A2 = E * (X2b X2^T + 1),     Z2b = X2b W2 + b2 - A2 G2
    o  = q + LN(Z2b)
    W1' = W1 - k^T (s G1),  b1' = b1 - sum_j s_j G1_j
    W2' = W2 - X2^T (s G2), b2' = b2 - sum_j s_j G2_j

Backward of one mini-batch, given `do` and the cotangent `dW1', db1', dW2', db2'` of the state
after it (the reverse chain's carry); `P1 = k dW1' + db1'`, `P2 = X2 dW2' + db2'`:

    dZ2b = LN_bwd(do);  dln_scale += sum do * xhat(Z2b);  dln_bias += sum do;  dq = do
    dA2 = -dZ2b G2^T;   dE = dA2 * (X2b X2^T + 1);   dS2 = dA2 * E
    dG2 = -A2^T dZ2b - s P2;             ds = -rowsum(G2 * P2)
    dX2b = dZ2b W2^T + dS2 X2;           dZ1b = dX2b * gelu'(Z1b)
    dq += dZ1b W1^T;  dA1 = -dZ1b G1^T;  dG1 = -A1^T dZ1b - s P1;  ds -= rowsum(G1 * P1)
    dk = -(s G1) dW1'^T;                 dX2 = dS2^T X2b - (s G2) dW2'^T
    dH = dG1 * gelu'(Z1);  dZ1 = dG1 * H * gelu''(Z1)     (G1 depends on Z1: gelu'' enters here)
    dG2 += dH W2
    (dZ2, dt, dln_scale, dln_bias) += LN-L2 backward of G2     (kernel_math.inner_grad_bwd)
    dX2 += dZ2 W2^T;  dZ1 += dX2 * gelu'(Z1);  dk += dZ1 W1^T
    dE += dA1 * (q k^T + 1) (masked j <= i);  dq += (dA1 * E) k;  dk += (dA1 * E)^T q - dt
    dv = dt;  deta_j = sum_i a_i dE_ij + a_{C-1} ds_j;  da_i += sum_j eta_j dE_ij
    da_{C-1} += sum_j eta_j ds_j
    dW1 = dW1' + q^T dZ1b + k^T dZ1;            db1 = db1' + sum dZ1b + sum dZ1
    dW2 = dW2' + X2b^T dZ2b + dH^T G2 + X2^T dZ2; db2 = db2' + sum dZ2b + sum dZ2

and `(dW1, db1, dW2, db2)` is the carry passed to the previous mini-batch; after the first it
is the cotangent of the initial state. Its autodiff twin is JAX autodiff of the XLA op, which
the CPU tests compare against (`tests/ops/ttt/test_mlp_kernel.py`).

What stays on chip (per program): the fp32 biases, the mini-batch's `[C, D]`, `[C, BF]` and
`[C, C]` tiles, and the sums for `ln_scale`, `ln_bias`, `token_scale`; the fp32 `W1, W2` (and in
the backward their cotangents) as loop carries, or in a per-program HBM buffer read one hidden
block at a time (`Launch.state_in`, `Launch.hidden_block`: knobs to tune on the GPU).

What is saved for the backward: the inputs (q, k, v, eta, token_scale, ln_scale, ln_bias) and
the fp32 state at the start of every `G`-th mini-batch (G = `checkpoint_group`, default 16),
never a per-token or per-mini-batch state of the whole sequence.

What is recomputed: per group, the backward replays the group's state chain from its checkpoint
into a per-program HBM scratch of G states (`W1, W2` in the compute dtype, biases fp32), then
recomputes each mini-batch's forward tiles from its scratch state during the reverse chain:
about two forwards plus the reverse chain.

Memory (bytes), N = ceil(T / C) mini-batches, F hidden, s = bytes of the compute dtype:
  saved:   B H ceil(N / G) (2 D F + F + D) 4              (1.63 GB at B=8, H=12, D=64, T=32K)
  scratch: B H G (2 D F s + 4 (F + D)), during the backward  (103 MB at the same shape, bf16)
           + B H 2 D F 4 with `state_in="hbm"` in the backward (12.6 MB)
  plus the outputs and gradients themselves; with T not a multiple of C, zero-padded copies of
  q, k, v, eta (one mini-batch longer) are made and kept.

D=128 (F=512, 512 KiB of fp32 state per head, 1 MiB with its cotangent) is not supported: it
fits neither registers nor one SM's shared memory, and a 2-CTA split is out of reach of the
Triton backend.

Interpret mode (`impl="pallas_interpret"`, the CPU tests) runs the same kernel bodies through the
Pallas interpreter, which cannot reach: the Triton compilation (PTX, registers and spills, shared
memory), the bf16 tensor-core MMAs and their rounding, `num_warps` / `num_stages`, the CTA
barriers that order the HBM scratch's and "hbm" state's writes and reads across threads (the
interpreter runs a program serially), and 64-bit addressing of inputs over 4 GiB. The lowering
to Triton IR itself runs on the CPU (`lower(lowering_platforms=("cuda",))`, tested).
"""

from __future__ import annotations

import jax.numpy as jnp

from ttt_jax.ops.ttt.kernel_common import fused, kernel_inputs, kernel_reason, resolve
from ttt_jax.ops.ttt.mlp_kernel_bwd import backward
from ttt_jax.ops.ttt.mlp_kernel_fwd import Launch, MLPKernelConfig, forward

SUPPORTED_DIMS = (16, 32, 64)
SUPPORTED_HIDDEN = (16, 32, 64, 128, 256)

__all__ = ["Launch", "launch_defaults", "resolve_impl", "ttt_mlp_pallas", "unsupported_reason"]


def unsupported_reason(q, hidden: int, mini_batch_size: int, state_dtype) -> str | None:
    """Why the kernel cannot take this call (None if it can); `hidden` is F (W1.shape[-1])."""
    return kernel_reason(
        q,
        mini_batch_size,
        state_dtype,
        SUPPORTED_DIMS,
        (hidden, SUPPORTED_HIDDEN, f"hidden width F={hidden} (W1.shape[-1])"),
    )


def resolve_impl(impl: str, q, hidden: int, mini_batch_size: int, state_dtype, segment_ids=None):
    """`"xla"`, `"pallas"` or `"pallas_interpret"` for the `impl` argument of `ttt_mlp`.

    `auto` takes the kernel on a GPU for the calls it supports and the XLA path elsewhere,
    and with `segment_ids` (the packed kernel path has passed the interpreter and
    Triton-lowering tests only; "pallas" opts in); `pallas` / `pallas_interpret` on an
    unsupported call raise a ValueError naming the argument and the supported set, `pallas`
    also off a GPU.
    """
    if impl == "auto" and segment_ids is not None:
        return "xla"
    return resolve(
        impl, lambda: unsupported_reason(q, hidden, mini_batch_size, state_dtype), segment_ids, None
    )


def launch_defaults(d: int, *, backward: bool, compute_dtype="bfloat16") -> Launch:
    """Per head dim and compute dtype, first guesses (H100 runs: bf16 at D=64 passes the GPU
    tests with these and was timed with them; `benchmarks/bench_ttt_mlp_kernel.py --config`
    tries others). At D=64 the backward would carry the 128 KiB state cotangent and the 128 KiB
    replay state at once, so it starts in "hbm".

    fp32 inputs take `num_stages=1`: with 2 at D=64 the kernels asked for more shared memory
    than an SM has (H100: 262 KB for the forward in "hbm", 445 KB for the backward, against
    227 KB); with 1 the forward fit and the fp32 GPU tests passed. (Presumably Triton's
    pipelining buffers the fp32 tiles twice; not checked in the compiled kernel.)
    """
    stages = 1 if jnp.dtype(compute_dtype) == jnp.float32 else 2
    if d == 64:
        return Launch(8, stages, 64, "hbm") if backward else Launch(8, stages, None, "registers")
    return Launch(4, stages, None, "registers")


def _config(launch: Launch | None, default: Launch, **static) -> MLPKernelConfig:
    launch = launch or default
    f = static["hidden"]
    stages = launch.num_stages or default.num_stages
    if launch.state_in == "hbm" and launch.num_stages is None:
        # Measured, not explained: the H100 forward in "hbm" with 2 stages gave a q gradient
        # off by 0.26 relative, with 1 it passes. The suspect is pipelining that prefetches
        # the next step's state reads ahead of this step's writes. The backward default
        # names its 2 stages and passes its GPU tests.
        stages = 1
    bf = launch.hidden_block or min(default.hidden_block or f, f)
    if bf < 16 or bf & (bf - 1) or f % bf:
        raise ValueError(
            f"Launch.hidden_block={bf} must be a power of two >= 16 dividing the hidden width F={f}"
        )
    return MLPKernelConfig(
        **static,
        num_warps=launch.num_warps or default.num_warps,
        num_stages=stages,
        hidden_block=bf,
        state_in=launch.state_in,
    )


def ttt_mlp_pallas(
    q,
    k,
    v,
    eta,
    state,
    ln_scale,
    ln_bias,
    token_scale,
    *,
    mini_batch_size: int,
    checkpoint_group: int | None,
    interpret: bool,
    fwd: Launch | None = None,
    bwd: Launch | None = None,
    poison: bool = False,
    segs=None,
):
    """TTT-MLP on the kernels; arguments already checked by `ttt_mlp`.

    Args:
      q, k, v: `[B, T, H, D]` float32 or bfloat16; eta: `[B, T, H]`.
      state: `(W1 [B, H, D, F], b1 [B, H, F], W2 [B, H, F, D], b2 [B, H, D])` initial state
        (cast to fp32).
      ln_scale, ln_bias: `[H, D]`; token_scale: `[C]`.
      mini_batch_size: C. checkpoint_group: G, the spacing of the saved states (None: 16).
      interpret: run under the Pallas interpreter.
      fwd, bwd: launch knobs of the forward and backward kernels (None: `launch_defaults`).
      poison: start the kernels' output buffers as NaN (tests of full coverage).
      segs: None, or packed documents on the kernels' sequence (`packed.run_packed_kernel`):
        `(flags [B, N] int32, (W1 [H, D, F], b1 [H, F], W2 [H, F, D], b2 [H, D]))`, each
        mini-batch's `RESET` / `COMMIT` bits and the state a reset restarts from (T = N C).

    Returns:
      `(o [B, T, H, D] dtype of q, W1, b1, W2, b2)`, the final state fp32.
    """
    t = q.shape[1]
    static, inputs = kernel_inputs(
        q, k, v, eta, token_scale, ln_scale, ln_bias, mini_batch_size=mini_batch_size,
        checkpoint_group=checkpoint_group, interpret=interpret, poison=poison,
    )  # fmt: skip
    static["hidden"] = state[0].shape[-1]
    static["segmented"] = segs is not None
    d = static["dim"]
    cd = static["compute_dtype"]
    fcfg = _config(fwd, launch_defaults(d, backward=False, compute_dtype=cd), **static)
    bcfg = _config(bwd, launch_defaults(d, backward=True, compute_dtype=cd), **static)
    state = tuple(x.astype(jnp.float32) for x in state)
    if segs is not None:
        segs = (segs[0], tuple(x.astype(jnp.float32) for x in segs[1]))
    o, *final = fused(forward, backward, fcfg, bcfg, *inputs, state, segs)
    return (o[:, :t], *final)
