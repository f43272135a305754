"""TTT-Linear through fused Pallas kernels (Triton backend) with a manual backward.

The same function as the XLA op in `linear.py` (per-token `eta`, `token_scale`, per-head
LayerNorm, output `q + LN(Z_bar)`, `initial_state` / final state, any T with a trailing partial
mini-batch read but not updating the state, fp32 state under bf16 inputs), computed by two
sequential kernels with one program per (sample, head), wrapped in a `jax.custom_vjp`.

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

Interpret mode (`impl="pallas_interpret"`, the CPU tests) runs the same kernel bodies through the
Pallas interpreter, which cannot reach: the Triton compilation (PTX, registers, shared memory),
the bf16 tensor-core MMAs and their rounding, `num_warps` / `num_stages`, the CTA barrier that
orders the scratch's writes and reads, and 64-bit addressing of inputs over 4 GiB. The lowering
to Triton IR itself does run on the CPU (`lower(lowering_platforms=("cuda",))`, tested); the GPU
test (`tests/ops/ttt/test_ttt_linear_kernel_gpu.py`) covers the rest.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ttt_jax.ops.core.checks import check_choice, check_positive_int
from ttt_jax.ops.ttt.kernel_bwd import backward
from ttt_jax.ops.ttt.kernel_fwd import KernelConfig, forward

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
SUPPORTED_DIMS = (16, 32, 64, 128)
SUPPORTED_MINI_BATCH = (16, 32, 64)
SUPPORTED_DTYPES = ("float32", "bfloat16")
DEFAULT_GROUP = 16


def unsupported_reason(q, mini_batch_size: int, state_dtype) -> str | None:
    """Why the kernel cannot take this call (None if it can)."""
    d = q.shape[-1]
    if d not in SUPPORTED_DIMS:
        return f"head dim D={d} (q.shape[-1]) is not one of {SUPPORTED_DIMS}"
    if mini_batch_size not in SUPPORTED_MINI_BATCH:
        return f"mini_batch_size={mini_batch_size} is not one of {SUPPORTED_MINI_BATCH}"
    if jnp.dtype(q.dtype).name not in SUPPORTED_DTYPES:
        return f"q dtype {jnp.dtype(q.dtype).name} is not one of {SUPPORTED_DTYPES}"
    if jnp.dtype(state_dtype) != jnp.float32:
        return f"state_dtype={jnp.dtype(state_dtype).name} must be float32"
    return None


def resolve_impl(impl: str, q, mini_batch_size: int, state_dtype, segment_ids=None) -> str:
    """`"xla"`, `"pallas"` or `"pallas_interpret"` for the `impl` argument of `ttt_linear`.

    `auto` takes the kernel on a GPU for the calls it supports and the XLA path elsewhere;
    `pallas` on an unsupported shape, dtype or backend raises a ValueError naming the argument
    and the supported set.
    """
    check_choice("impl", impl, IMPLS)
    if impl == "xla":
        return "xla"
    reason = unsupported_reason(q, mini_batch_size, state_dtype)
    if reason is None and segment_ids is not None:
        reason = "segment_ids is not supported by the kernel yet (only segment_ids=None)"
    return dispatch(impl, reason)


def dispatch(impl: str, reason: str | None) -> str:
    """The backend for a checked `impl` other than "xla", given why the kernel cannot take the
    call (None if it can); shared by the TTT-Linear and TTT-MLP kernels."""
    on_gpu = jax.default_backend() == "gpu"
    if impl == "auto":
        return "pallas" if on_gpu and reason is None else "xla"
    if reason is not None:
        raise ValueError(f"impl={impl!r} does not support this call: {reason}")
    if impl == "pallas" and not on_gpu:
        raise ValueError(
            f"impl='pallas' needs a CUDA GPU backend, got jax.default_backend()="
            f"{jax.default_backend()!r}; use impl='pallas_interpret' (the Pallas interpreter, "
            "for tests) or impl='xla'"
        )
    return impl


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

    Returns:
      `(o [B, T, H, D] dtype of q, W [B, H, D, D] fp32, b [B, H, D] fp32)`.
    """
    bsz, t, heads, d = q.shape
    c = mini_batch_size
    group = check_positive_int("checkpoint_group", checkpoint_group or DEFAULT_GROUP)
    n_chunks = -(-t // c)
    warps, stages = launch_defaults(d)
    cfg = KernelConfig(
        batch=bsz,
        heads=heads,
        dim=d,
        mini_batch=c,
        n_chunks=n_chunks,
        n_full=t // c,
        group=min(group, n_chunks),
        compute_dtype=jnp.dtype(q.dtype).name,
        interpret=interpret,
        num_warps=num_warps or warps,
        num_stages=num_stages or stages,
        poison=poison,
    )
    f32 = jnp.float32
    eta = eta.astype(f32)
    pad = n_chunks * c - t
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        eta = jnp.pad(eta, ((0, 0), (0, pad), (0, 0)))
    o, w, b = _fused(
        cfg,
        q,
        k,
        v,
        eta,
        token_scale.astype(f32),
        ln_scale.astype(f32),
        ln_bias.astype(f32),
        w0.astype(f32),
        b0.astype(f32),
    )
    return o[:, :t], w, b


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, q, k, v, eta, token_scale, ln_scale, ln_bias, w0, b0):
    return tuple(
        forward(cfg, q, k, v, eta, token_scale, ln_scale, ln_bias, w0, b0, with_checkpoints=False)
    )


def _fused_fwd(cfg, q, k, v, eta, token_scale, ln_scale, ln_bias, w0, b0):
    o, w, b, ckw, ckb = forward(
        cfg, q, k, v, eta, token_scale, ln_scale, ln_bias, w0, b0, with_checkpoints=True
    )
    return (o, w, b), (q, k, v, eta, token_scale, ln_scale, ln_bias, ckw, ckb)


def _fused_bwd(cfg, res, cts):
    do, dwf, dbf = cts
    dq, dk, dv, deta, dw0, db0, dlnw, dlnb, dts = backward(cfg, *res, do, dwf, dbf)
    return dq, dk, dv, deta, dts.sum((0, 1)), dlnw.sum(0), dlnb.sum(0), dw0, db0


_fused.defvjp(_fused_fwd, _fused_bwd)
