"""In-Place TTT (ICLR 2026, SPEC 3.3): the down projection of a gated MLP is the fast weight.

Per sample, with the MLP hidden activations `Z` (`[T, F]`) cut into chunks of C tokens, targets
`V = conv(X0) @ W_target` (`conv` depthwise over time *within* each chunk) and learning rate
`eta`:

    Delta_i = clip(V_i^T Z_i)            [d, F], clip: scale to Frobenius norm <= tau (optional)
    S_i     = sum_{j < i} Delta_j        exclusive: chunk i never sees itself
    O_i     = Z_i (W_down + eta S_i)^T   [C, d]

The per-chunk weights `W_down + eta S_i` (`[B, n_chunks, d, F]`, what the official code
materialises) are never formed: one state is carried through a scan (`prefix.py`: the
math and the plain forms) and the custom backward carries one running sum in reverse
(`vjp.py`). Packed documents (`segment_ids`) are laid out by
`ttt_jax.ops.core.segments`, the targets computed by `targets.py`.

Two forms of the state inside the op, for speed:

- without `segment_ids`, the scan carries `W` itself, so every chunk costs one read matmul and
  one delta matmul (the read includes `Z W_down^T`, the plain MLP's own down projection);
- with `segment_ids`, it carries the offset `E = W - W_down`, which resets to zero at each new
  document: tokens whose state is `W_down` (a document's first chunk) need no read, and the
  base `Z W_down^T` is one matmul over all tokens. One `T x d x F` matmul more than the
  unpacked path; tokens are gathered slot by slot, so no reordered copy of Z is made (the
  targets X0, d wide, are gathered once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from ttt_jax.ops.core.checks import (
    BACKWARDS,
    check_choice,
    check_finite_number,
    check_float,
    check_float_dtype,
    check_nonempty,
    check_policy_names,
    check_positive_int,
    check_shapes,
    check_state_type,
)
from ttt_jax.ops.core.scan import check_scan_knobs
from ttt_jax.ops.core.segments import gather_time, slot_layout
from ttt_jax.ops.inplace.prefix import NAMES, PREFIXES, PrefixConfig
from ttt_jax.ops.inplace.targets import CONV_KERNEL_SIZES, chunk_targets
from ttt_jax.ops.inplace.vjp import fast_weight_reads


@struct.dataclass
class InPlaceState:
    """Per-sample fast weight after the last complete chunk: `w_down: [B, d, F]` (state dtype)."""

    w_down: jax.Array


def _check_args(
    *,
    z,
    target,
    w_down,
    w_target,
    conv_kernel,
    eta,
    chunk_size,
    conv_mode,
    clip_tau,
    segment_ids,
    initial_state,
    checkpoint_group,
    remat_policy,
    state_dtype,
    prefix,
    backward,
    unroll,
):
    """The checks of `inplace_ttt`, taking its arguments by name (`_check_args(**locals())`
    as its first statement, so the list is written once, in the op's signature)."""
    del unroll  # speed only, no check of its own
    check_positive_int("chunk_size", chunk_size)
    check_choice("conv_mode", conv_mode, tuple(CONV_KERNEL_SIZES))
    check_choice("prefix", prefix, PREFIXES)
    check_choice("backward", backward, BACKWARDS)
    check_float(z=z, target=target, w_down=w_down, w_target=w_target, conv_kernel=conv_kernel)
    check_float_dtype("state_dtype", state_dtype)
    specs = [
        ("z", z, ("B", "T", "F")),
        ("target", target, ("B", "T", "d")),
        ("w_down", w_down, ("d", "F")),
        ("w_target", w_target, ("d", "d")),
        ("conv_kernel", conv_kernel, ("K", "d")),
        ("segment_ids", segment_ids, ("B", "T")),
    ]
    check_state_type("initial_state", initial_state, InPlaceState)
    if initial_state is not None:
        specs.append(("initial_state.w_down", initial_state.w_down, ("B", "d", "F")))
    dims = check_shapes(specs)
    check_nonempty("z", z)
    want_k = CONV_KERNEL_SIZES[conv_mode]
    if conv_kernel.shape[0] != want_k:
        raise ValueError(
            f"conv_kernel has {conv_kernel.shape[0]} taps but conv_mode={conv_mode!r} needs "
            f"{want_k}: expected shape ({want_k}, {dims['d']})"
        )
    if z.dtype != target.dtype:
        raise ValueError(f"z and target must share a dtype, got {z.dtype} and {target.dtype}")
    if segment_ids is not None and not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}")
    if jnp.ndim(eta) != 0:
        raise ValueError(f"eta must be a scalar (float or 0-d array), got shape {jnp.shape(eta)}")
    if not isinstance(eta, int | float):
        check_float(eta=eta)
    check_finite_number("eta", eta, allow_array=True)
    if clip_tau is not None:
        check_finite_number("clip_tau", clip_tau, positive=True)
    check_scan_knobs(checkpoint_group, remat_policy)
    check_policy_names(remat_policy, NAMES, "inplace_ttt")
    return dims


def inplace_ttt(
    z: jax.Array,
    target: jax.Array,
    *,
    w_down: jax.Array,
    w_target: jax.Array,
    conv_kernel: jax.Array,
    eta: float | jax.Array,
    chunk_size: int,
    conv_mode: str = "centered",
    clip_tau: float | None = None,
    segment_ids: jax.Array | None = None,
    initial_state: InPlaceState | None = None,
    checkpoint_group: int | None = None,
    remat_policy: str | None = None,
    state_dtype=jnp.float32,
    prefix: str = "sequential",
    backward: str = "custom",
    unroll: int = 1,
) -> tuple[jax.Array, InPlaceState]:
    """In-Place TTT over a sequence: the MLP's down projection learns chunk by chunk.

    Args:
      z: `[B, T, F]` gated-MLP hidden activations `act(x W_gate) * (x W_up)`; bf16 or fp32,
        the compute dtype of every matmul (fp32 accumulation). T need not be a multiple of C.
      target: `[B, T, d]` raw targets X0 (token embeddings or the MLP input), z's dtype.
      w_down: `[d, F]` slow down projection, `O = Z W^T`; the state every document after the
        call's first starts from, and the first one too without `initial_state`.
      w_target: `[d, d]` target projection, applied as `conv(X0) @ w_target`.
      conv_kernel: `[K, d]` depthwise conv taps, K = 5 (`centered`: `sum_j kernel[j] *
        x[t + j - 2]`) or 2 (`causal_next`: `kernel[0] * x[t] + kernel[1] * x[t + 1]`), zero
        outside the chunk (and the document).
      eta: scalar learning rate (Python float or 0-d array; differentiable).
      chunk_size: C, tokens per update (512 to 4096 in the paper).
      conv_mode: `centered` or `causal_next`.
      clip_tau: if set, each chunk's `Delta` is scaled down to Frobenius norm `tau` when
        larger (per sample).
      segment_ids: `[B, T]` integers, a new document wherever the id changes. Documents never
        see each other: chunks restart at each document's first token, the conv never crosses
        a document, later documents start from `w_down`.
      initial_state: state the call's first document continues from (`w_down: [B, d, F]`).
      checkpoint_group, remat_policy: memory knobs of the `backward="autodiff"` sequential
        scan (`ttt_jax.ops.core.scan`); the custom backward keeps no per-chunk state, so
        they change nothing there (gradients are identical either way).
      state_dtype: dtype of the fast weight and its updates (fp32 by default).
      prefix: `sequential` (a scan, memory-lean, default) or `associative`
        (`lax.associative_scan`, parallel over chunks; its forward materialises per-chunk
        states `[n_chunks, B, d, F]`).
      backward: `custom` (reverse-scan VJP, `ttt_jax.ops.inplace.prefix`) or `autodiff`.
      unroll: scan unroll factor (speed only).

    Returns:
      `o: [B, T, d]` in z's dtype, and the state after the last complete chunk of the last
      document (a trailing partial chunk is read but does not update it).

    Raises:
      ValueError: before tracing, naming the argument: a non-positive chunk size, a conv kernel
        of the wrong length for the mode, bad `segment_ids` shape or dtype, `clip_tau <= 0`,
        a non-scalar `eta`, any shape mismatch.
    """
    dims = _check_args(**locals())  # first: locals() are exactly the arguments
    cd, c, t, b = z.dtype, chunk_size, dims["T"], dims["B"]
    cfg = PrefixConfig(
        chunk_size=c,
        clip_tau=None if clip_tau is None else float(clip_tau),
        prefix=prefix,
        backward=backward,
        compute_dtype=jnp.dtype(cd),
        state_dtype=jnp.dtype(state_dtype),
        checkpoint_group=checkpoint_group,
        remat_policy=remat_policy,
        unroll=unroll,
    )
    eta = jnp.asarray(eta, state_dtype)
    if initial_state is None:
        w0 = jnp.broadcast_to(w_down.astype(state_dtype), (b, *w_down.shape))
    else:
        w0 = initial_state.w_down.astype(state_dtype)

    n = t // c

    def targets(x):
        if not n:
            return jnp.zeros((b, 0, dims["d"]), cd)
        chunks = x[:, : n * c].reshape(b, n, c, x.shape[-1])
        v = chunk_targets(
            chunks, w_target, conv_kernel, conv_mode, cd, custom_vjp=backward == "custom"
        )
        return v.reshape(b, n * c, -1)

    if segment_ids is None:
        o, w = fast_weight_reads(w0, eta, z, targets(target), n=n, cfg=cfg)
        return o.astype(cd), InPlaceState(w_down=w)

    lay = slot_layout(segment_ids, c, state_dtype)
    o, e = fast_weight_reads(
        w0 - w_down.astype(state_dtype)[None],
        eta,
        z,
        targets(gather_time(target, lay.delta_idx)),
        n=n,
        cfg=cfg,
        w_base=w_down,
        keep=lay.keep,
        delta_idx=lay.delta_idx,
        read_idx=lay.read_idx,
        last_idx=lay.last_read_idx,
    )
    # The carried offset is the last document's only if it had a complete chunk (or is the
    # call's first); a later document without one is still at w_down.
    e = jnp.where(lay.last_continues[:, None, None], e, jnp.zeros_like(e))
    w = (w_down.astype(state_dtype)[None] + e).astype(state_dtype)
    return o.astype(cd), InPlaceState(w_down=w)
