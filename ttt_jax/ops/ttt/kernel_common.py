"""The harness both TTT Pallas kernels (TTT-Linear, `linear_kernel.py`; TTT-MLP, `mlp_kernel.py`)
run in: what each kernel's own files leave out because it is the same for both.

Outside the kernels: the `impl` choice (`resolve`, `dispatch`, `kernel_reason`), the static facts
of a call and its inputs padded to whole mini-batches (`kernel_inputs`), and the `custom_vjp`
that joins a forward and a backward kernel (`fused`). Inside: the static config's shared fields
(`KernelConfig`), the `pallas_call` over the `(B, H)` grid (`call`), the per-mini-batch loads
and stores (`chunk_inputs`, `head_params`, `store_input_grads`), the backward's loop over the
checkpoint groups (`reverse_groups`), the CTA barrier, and the output shapes of the state.

A kernel pair plugs in as two functions of the same form, `forward(cfg, q, k, v, eta,
token_scale, ln_scale, ln_bias, state, *, segs, with_checkpoints) -> (o, *final_state,
*checkpoints)` and `backward(cfg, q, k, v, eta, token_scale, ln_scale, ln_bias, checkpoints,
do, dstate, *, segs) -> (dq, dk, dv, deta, *dstate0, dln_scale, dln_bias, dtoken_scale)`, where
`state` is the tuple of the state's fp32 fields and the last three are per-(sample, head)
partial sums. With `cfg.segmented`, `segs = (flags, reset)` (packed documents: per-mini-batch
`RESET` / `COMMIT` bits and the state a reset restarts from, `maybe_reset`) and the backward
also returns the per-sample cotangent of `reset` (`collect_reset_grads`); otherwise `segs` is
None.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.core.checks import check_choice, check_positive_int
from ttt_jax.ops.ttt import kernel_math as km
from ttt_jax.ops.ttt.packed import COMMIT, RESET

with warnings.catch_warnings():
    # The Triton backend is deprecated from jax 0.11 on; it is the one that runs at C = 16.
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
SUPPORTED_MINI_BATCH = (16, 32, 64)
SUPPORTED_DTYPES = ("float32", "bfloat16")
DEFAULT_GROUP = 16


def kernel_reason(
    q, mini_batch_size: int, state_dtype, dims: Sequence[int], *more: tuple
) -> str | None:
    """Why a TTT kernel cannot take a call (None if it can): the head dim must be one of `dims`,
    then each `(value, supported, what)` of `more` must hold, then the mini-batch, q's dtype and
    an fp32 state (the first that fails is named)."""
    d = q.shape[-1]
    name = jnp.dtype(q.dtype).name
    for value, supported, what in (
        (d, dims, f"head dim D={d} (q.shape[-1])"),
        *more,
        (mini_batch_size, SUPPORTED_MINI_BATCH, f"mini_batch_size={mini_batch_size}"),
        (name, SUPPORTED_DTYPES, f"q dtype {name}"),
    ):
        if value not in supported:
            return f"{what} is not one of {supported}"
    if jnp.dtype(state_dtype) != jnp.float32:
        return f"state_dtype={jnp.dtype(state_dtype).name} must be float32"
    return None


def resolve(
    impl: str, reason: Callable[[], str | None], segment_ids, no_segments: str | None
) -> str:
    """`"xla"`, `"pallas"` or `"pallas_interpret"` for an op's `impl` argument.

    `reason()` says why the kernel cannot take the call (None if it can; not asked for "xla");
    `no_segments` is the reason when `segment_ids` is given (None: the kernel takes them).
    """
    check_choice("impl", impl, IMPLS)
    if impl == "xla":
        return "xla"
    why = reason()
    if why is None and segment_ids is not None and no_segments is not None:
        why = no_segments
    return dispatch(impl, why)


def dispatch(impl: str, reason: str | None) -> str:
    """The backend for a checked `impl` other than "xla", given why the kernel cannot take the
    call (None if it can): `auto` takes the kernel on a GPU, `pallas` / `pallas_interpret` raise
    on an unsupported call, `pallas` also off a GPU."""
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


def kernel_inputs(
    q, k, v, eta, token_scale, ln_scale, ln_bias, *, mini_batch_size: int,
    checkpoint_group: int | None, interpret: bool, poison: bool,
):  # fmt: skip
    """The static facts of a call (the `KernelConfig` fields but the launch's) and the kernels'
    inputs `(q, k, v, eta, token_scale, ln_scale, ln_bias)`: `eta` and the parameters fp32, and,
    with T not a multiple of C, q, k, v, eta zero-padded by one mini-batch."""
    bsz, t, heads, d = q.shape
    c = mini_batch_size
    group = check_positive_int("checkpoint_group", checkpoint_group or DEFAULT_GROUP)
    n_chunks = -(-t // c)
    static = dict(
        batch=bsz,
        heads=heads,
        dim=d,
        mini_batch=c,
        n_chunks=n_chunks,
        n_full=t // c,
        group=min(group, n_chunks),
        compute_dtype=jnp.dtype(q.dtype).name,
        interpret=interpret,
        poison=poison,
    )
    f32 = jnp.float32
    eta = eta.astype(f32)
    pad = n_chunks * c - t
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        eta = jnp.pad(eta, ((0, 0), (0, pad), (0, 0)))
    params = (x.astype(f32) for x in (token_scale, ln_scale, ln_bias))
    return static, (q, k, v, eta, *params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def fused(forward, backward, fcfg, bcfg, q, k, v, eta, token_scale, ln_scale, ln_bias, state,
          segs=None):  # fmt: skip
    """`(o, *final_state)` of the forward kernel, differentiated by the backward kernel (module
    docstring); `fcfg`, `bcfg` their static configs. `segs`: None, or `(flags [B, N] int32,
    reset)` for configs with `segmented` (`RESET`, `COMMIT`; `reset` the state's fp32 fields
    `[H, ...]` a flagged mini-batch restarts from)."""
    args = (q, k, v, eta, token_scale, ln_scale, ln_bias, state)
    return tuple(forward(fcfg, *args, segs=segs, with_checkpoints=False))


def _fused_fwd(forward, backward, fcfg, bcfg, q, k, v, eta, token_scale, ln_scale, ln_bias, state,
               segs=None):  # fmt: skip
    args = (q, k, v, eta, token_scale, ln_scale, ln_bias, state)
    outs = forward(fcfg, *args, segs=segs, with_checkpoints=True)
    n = 1 + len(state)
    return tuple(outs[:n]), (*args[:-1], tuple(outs[n:]), segs)


def _fused_bwd(forward, backward, fcfg, bcfg, res, cts):
    *res, segs = res
    do, *dstate = cts
    dq, dk, dv, deta, *rest = backward(bcfg, *res, do, dstate, segs=segs)
    dsegs = None
    if segs is not None:
        *rest, dreset = rest
        dsegs = (None, tuple(x.sum(0) for x in dreset))
    *dstate0, dlnw, dlnb, dts = rest
    grads = (dq, dk, dv, deta, dts.sum((0, 1)), dlnw.sum(0), dlnb.sum(0), tuple(dstate0))
    return (*grads, dsegs)


fused.defvjp(_fused_fwd, _fused_bwd)


@dataclasses.dataclass(frozen=True, kw_only=True)
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
      segmented: the kernels read per-mini-batch flags (`RESET`, `COMMIT`) and a reset state
        (packed documents, `packed.run_packed_kernel`); otherwise mini-batch i commits its
        update iff `i < n_full` and nothing resets.
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
    segmented: bool = False

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


def kernel_partial(fn, **kw):
    """`fn` with its static keywords bound, named after it (the name the profiles show)."""

    def kernel(*refs):
        return fn(*refs, **kw)

    kernel.__name__ = fn.__name__.lstrip("_")
    return kernel


def forward_out_shape(cfg: KernelConfig, q, fields, with_checkpoints: bool) -> list:
    """`o` (shape and dtype of q), the fp32 final state `[B, H, *field]` per state field shape
    in `fields`, and with `with_checkpoints` the fp32 checkpoints `[B, H, n_groups, *field]`."""
    bsz, _, heads, _ = q.shape
    sd, f32 = jax.ShapeDtypeStruct, jnp.float32
    out_shape = [sd(q.shape, q.dtype)] + [sd((bsz, heads, *s), f32) for s in fields]
    if with_checkpoints:
        out_shape += [sd((bsz, heads, cfg.n_groups, *s), f32) for s in fields]
    return out_shape


def backward_out_shape(cfg: KernelConfig, q, fields) -> list:
    """`dq, dk, dv` (as q), `deta [B, T, H]`, the fp32 initial-state cotangents per field shape,
    and the partial sums `dln_scale, dln_bias [B, H, D]`, `dtoken_scale [B, H, C]` (fp32)."""
    bsz, t, heads, d = q.shape
    sd, f32 = jax.ShapeDtypeStruct, jnp.float32
    out_shape = [sd(q.shape, q.dtype)] * 3 + [sd((bsz, t, heads), f32)]
    out_shape += [sd((bsz, heads, *s), f32) for s in fields]
    return out_shape + [sd((bsz, heads, d), f32)] * 2 + [sd((bsz, heads, cfg.mini_batch), f32)]


def commits(cfg: KernelConfig, flags_ref, b, i):
    """Whether mini-batch `i` of sample `b` writes its update back (a traced bool)."""
    if cfg.segmented:
        return lax.bitwise_and(flags_ref[b, i], COMMIT) != 0
    return i < cfg.n_full


def resets(flags_ref, b, i):
    """Whether mini-batch `i` of sample `b` starts from the reset state (a traced bool)."""
    return lax.bitwise_and(flags_ref[b, i], RESET) != 0


def maybe_reset(flags_ref, reset_refs, carry, b, h, i):
    """The state mini-batch `i` starts from: head `h`'s reset state (fields `reset_refs`,
    `[H, ...]`) where it is flagged `RESET`, else the carried `carry` (same fields)."""
    return lax.cond(
        resets(flags_ref, b, i),
        lambda: tuple(r[h] for r in reset_refs),
        lambda: tuple(carry),
    )


def collect_reset_grads(flags_ref, dreset_refs, dcarry, b, h, i):
    """The backward of `maybe_reset` at mini-batch `i`: where it reset, the cotangent of its
    starting state `dcarry` adds into `dreset_refs` (`[B, H, ...]`, this program's own rows)
    and the carried state before it gets none. Returns the cotangent carried on."""
    r = resets(flags_ref, b, i)

    @pl.when(r)
    def _():
        for ref, x in zip(dreset_refs, dcarry, strict=True):
            ref[b, h] = ref[b, h] + x

    return tuple(jnp.where(r, jnp.zeros_like(x), x) for x in dcarry)


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


def head_params(lnw_ref, lnb_ref, ts_ref, h, c):
    """`(gamma, beta, a_causal, a_last)`: head `h`'s output LayerNorm scale and bias `[1, D]`,
    `token_scale[i]` where `j <= i` (`[C, C]`, else 0), and `token_scale[C-1]`."""
    a = ts_ref[:]
    a_causal = jnp.where(km.causal(c), a[:, None], 0.0)
    return lnw_ref[h, :][None, :], lnb_ref[h, :][None, :], a_causal, ts_ref[c - 1]


def store_input_grads(refs, b, h, rows, grads) -> None:
    """Writes one mini-batch's `dq, dk, dv [C, D]` (cast to the refs' dtype) and `deta [C]` to
    `refs = (dq_ref, dk_ref, dv_ref, deta_ref)` at sample `b`, head `h`, token `rows`."""
    dq_ref, dk_ref, dv_ref, deta_ref = refs
    dq, dk, dv, deta = grads
    dq_ref[b, rows, h, :] = dq.astype(dq_ref.dtype)
    dk_ref[b, rows, h, :] = dk.astype(dk_ref.dtype)
    dv_ref[b, rows, h, :] = dv.astype(dv_ref.dtype)
    deta_ref[b, rows, h] = deta


def reverse_groups(cfg: KernelConfig, replay, reverse, checkpoint, dstate, sum_refs, b, h):
    """The backward kernels' outer loop, over the checkpoint groups in reverse.

    Per group: `replay(start)`, a `fori_loop` body over the group's mini-batches started from
    `checkpoint(group index)`, writes each one's starting state to the scratch; then
    `reverse(start, count)`, a body over them in reverse order, carries `(*dstate, dln_scale,
    dln_bias, dtoken_scale)`. `dstate` is the state cotangent's carry after the last
    mini-batch; the three sums start at zero and are written to `sum_refs` at `[b, h]`.

    Returns:
      the state cotangent's carry before the first mini-batch (that of the initial state).
    """

    def group_body(gi, carry):
        grp = cfg.n_groups - 1 - gi
        start = grp * cfg.group
        count = jnp.minimum(cfg.group, cfg.n_chunks - start)
        lax.fori_loop(0, count, replay(start), checkpoint(grp))
        barrier(cfg)  # the scratch's writes before the reverse chain's reads
        carry = lax.fori_loop(0, count, reverse(start, count), carry)
        barrier(cfg)  # and its reads before the next group's replay overwrites it
        return carry

    d, f32 = cfg.dim, jnp.float32
    sums = (jnp.zeros((d,), f32), jnp.zeros((d,), f32), jnp.zeros((cfg.mini_batch,), f32))
    *dstate, dgamma, dbeta, dts = lax.fori_loop(0, cfg.n_groups, group_body, (*dstate, *sums))
    for ref, x in zip(sum_refs, (dgamma, dbeta, dts), strict=True):
        ref[b, h, :] = x
    return dstate


def barrier(cfg: KernelConfig) -> None:
    """Orders one program's HBM writes and reads across its threads (a CTA barrier: the
    scratch is written and read back by different threads); the interpreter runs a program
    serially."""
    if not cfg.interpret:
        pltriton.debug_barrier()
