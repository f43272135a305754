"""TTT-Linear through fused Pallas kernels (Triton backend) with a manual backward.

The same function as the XLA op in `linear.py` (per-token `eta`, `token_scale`, per-head
LayerNorm, output `q + LN(Z_bar)`, `initial_state` / final state, any T with a trailing partial
mini-batch read but not updating the state, fp32 state under bf16 inputs), computed by two
sequential kernels with one program per (sample, head) (`kernel_fwd.py`, `kernel_bwd.py`),
wrapped in a `jax.custom_vjp` (the harness both TTT kernels share: `kernel_common.py`).

What stays on chip (per program, as loop carries):
  forward: the fp32 state `W [D, D]`, `b [D]`; each mini-batch's `[C, D]` tiles.
  backward: the fp32 state cotangent `dW [D, D]`, `db [D]`, the running sums for `ln_scale`,
  `ln_bias` (`[D]`) and `token_scale` (`[C]`), and the replay state of the current group.

What is saved for the backward: the inputs (q, k, v, eta, token_scale, ln_scale, ln_bias) and
the fp32 state at the start of every `G`-th mini-batch (G = `checkpoint_group`, default 16),
never a per-token or per-mini-batch weight of the whole sequence.

What is recomputed: per group, the backward replays the group's state chain from its checkpoint
into a per-program HBM scratch of G states (compute dtype), then recomputes each mini-batch's
forward tiles (Z, G, Z_bar and their LayerNorm statistics) from its scratch state during the
reverse chain. The backward thus costs about two forwards plus the reverse chain.

Memory (bytes), N = ceil(T / C) mini-batches, s = bytes of the compute dtype:
  saved:   B H ceil(N / G) (D^2 + D) 4                     (201 MB at B=8, H=12, D=64, T=32K)
  scratch: B H G (D^2 s + 4 D), alive during the backward  (12.6 MB at the same shape, bf16)
  plus the outputs and gradients themselves; with T not a multiple of C, zero-padded copies of
  q, k, v, eta (one mini-batch longer) are made and kept.

Packed documents (`segment_ids`): the kernels walk the slot scan of the XLA path's
`packed.run_packed` flattened (`packed.kernel_layout`): per slot of C tokens, a mini-batch of
the previous document's tail (read with the state entering the slot, no update) and one of the
slot's own tokens (restarting from the slow weights `W1, b1` where it starts a document), then
the reads after the last slot: `2 N + 1` mini-batches (N = T // C) of q, k, v, eta gathered
into that order (one copy), with per-mini-batch `RESET` / `COMMIT` bits. The reset is a
`lax.cond` in the loop, the backward sums the reset state's cotangent per program into a
`[B, H, D, D]` output (only at resets). Documents shorter than C other than the call's first
are read in XLA (`packed._short_docs`, the XLA path's constant reads). The saved states and the
scratch above then count `2 N + 1` mini-batches; tail mini-batches of slots without a tail
still run (all padding: zero rates), so packing costs up to twice the unpacked kernel time.

Interpret mode (`impl="pallas_interpret"`, the CPU tests) runs the same kernel bodies through the
Pallas interpreter, which cannot reach: the Triton compilation (PTX, registers, shared memory),
the bf16 tensor-core MMAs and their rounding, `num_warps` / `num_stages`, the CTA barrier that
orders the scratch's writes and reads, and 64-bit addressing of inputs over 4 GiB. The lowering
to Triton IR itself does run on the CPU (`lower(lowering_platforms=("cuda",))`, tested); the GPU
test (`tests/ops/ttt/test_ttt_linear_kernel_gpu.py`) covers the rest.
"""

from __future__ import annotations

import jax.numpy as jnp

from ttt_jax.ops.ttt.kernel_bwd import backward
from ttt_jax.ops.ttt.kernel_common import KernelConfig, fused, kernel_inputs, kernel_reason, resolve
from ttt_jax.ops.ttt.kernel_fwd import forward

SUPPORTED_DIMS = (16, 32, 64, 128)


def unsupported_reason(q, mini_batch_size: int, state_dtype) -> str | None:
    """Why the kernel cannot take this call (None if it can)."""
    return kernel_reason(q, mini_batch_size, state_dtype, SUPPORTED_DIMS)


def resolve_impl(impl: str, q, mini_batch_size: int, state_dtype, segment_ids=None) -> str:
    """`"xla"`, `"pallas"` or `"pallas_interpret"` for the `impl` argument of `ttt_linear`.

    `auto` takes the kernel on a GPU for the calls it supports and the XLA path elsewhere;
    with `segment_ids` it takes XLA until the packed kernel path has passed the GPU check
    (it has passed the interpreter and Triton-lowering tests only; "pallas" opts in).
    `pallas` on an unsupported shape, dtype or backend raises a ValueError naming the argument
    and the supported set.
    """
    if impl == "auto" and segment_ids is not None:
        return "xla"
    return resolve(
        impl, lambda: unsupported_reason(q, mini_batch_size, state_dtype), segment_ids, None
    )


def launch_defaults(d: int) -> tuple[int, int]:
    """`(num_warps, num_stages)` per head dim: untuned first guesses (no GPU run has tuned them
    yet; `benchmarks/bench_ttt_kernel.py --sweep` measures the candidates)."""
    return {16: (2, 2), 32: (2, 2), 64: (4, 2), 128: (8, 2)}[d]


def ttt_linear_pallas(
    q,
    k,
    v,
    eta,
    w0,
    b0,
    ln_scale,
    ln_bias,
    token_scale,
    *,
    mini_batch_size: int,
    checkpoint_group: int | None,
    interpret: bool,
    num_warps: int | None = None,
    num_stages: int | None = None,
    poison: bool = False,
    segs=None,
):
    """TTT-Linear on the kernels; arguments already checked by `ttt_linear`.

    Args:
      q, k, v: `[B, T, H, D]` float32 or bfloat16; eta: `[B, T, H]`.
      w0, b0: `[B, H, D, D]`, `[B, H, D]` initial state (cast to fp32).
      ln_scale, ln_bias: `[H, D]`; token_scale: `[C]`.
      mini_batch_size: C. checkpoint_group: G, the spacing of the saved states (None: 16).
      interpret: run under the Pallas interpreter.
      num_warps, num_stages: Triton launch overrides (benchmarks); None takes the defaults.
      poison: start the kernels' output buffers as NaN (tests of full coverage).
      segs: None, or packed documents on the kernels' sequence (`packed.run_packed_kernel`):
        `(flags [B, N] int32, (W [H, D, D], b [H, D]))`, each mini-batch's `RESET` / `COMMIT`
        bits and the state a reset restarts from (T must then be `N C`).

    Returns:
      `(o [B, T, H, D] dtype of q, W [B, H, D, D] fp32, b [B, H, D] fp32)`.
    """
    t = q.shape[1]
    static, inputs = kernel_inputs(
        q, k, v, eta, token_scale, ln_scale, ln_bias, mini_batch_size=mini_batch_size,
        checkpoint_group=checkpoint_group, interpret=interpret, poison=poison,
    )  # fmt: skip
    warps, stages = launch_defaults(static["dim"])
    cfg = KernelConfig(
        **static,
        num_warps=num_warps or warps,
        num_stages=num_stages or stages,
        segmented=segs is not None,
    )
    state = tuple(x.astype(jnp.float32) for x in (w0, b0))
    if segs is not None:
        segs = (segs[0], tuple(x.astype(jnp.float32) for x in segs[1]))
    o, w, b = fused(forward, backward, cfg, cfg, *inputs, state, segs)
    return o[:, :t], w, b
