"""LaCT: large-chunk test-time training with SwiGLU fast weights (Zhang et al. 2025, SPEC 3.2).

Per sample and head a SwiGLU fast weight `f(x) = w1 (silu(w0 x) * (w2 x))` is read by every
token of a chunk of C tokens (default 2048) and then takes one step on the chunk's keys and
values (`math.py`: the math; optional momentum, Muon and weight norm). The family's files:

- `math.py`: one chunk's read and inner step, batched over samples and heads;
- `autodiff.py`: chunk slicing and the plain-autodiff form (`backward="autodiff"`);
- `vjp.py`: the custom VJP that keeps only chunk-boundary states (`backward="custom"`);
- `packed.py`: packed documents (`segment_ids`), chunks restarting at each document;
- `mixed_matmul.py`: the matmul whose backward takes bf16 operands (`backward_dtype`);
- `op.py` (this file): the public op, its state, argument checks, and the low-rank initial
  weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental import checkify

from ttt_jax.ops.core.checks import (
    BACKWARDS,
    check_choice,
    check_float,
    check_float_dtype,
    check_nonempty,
    check_policy_names,
    check_positive_int,
    check_shapes,
)
from ttt_jax.ops.core.numerics import matmul, wide_dtype
from ttt_jax.ops.core.scan import check_scan_knobs
from ttt_jax.ops.lact.math import NAMES, Chunk, ChunkConfig, row_norms
from ttt_jax.ops.lact.packed import packed_reads
from ttt_jax.ops.lact.vjp import lact_reads

LOW_RANK_IDENTITY = 0.5


@struct.dataclass
class LaCTState:
    """Per-sample fast weights after the last complete chunk (state dtype).

    Attributes:
      w0, w2: `[B, H, Dh, D]`.
      w1: `[B, H, D, Dh]`.
      m0, m1, m2: momentum buffers shaped like w0, w1, w2 (zeros when the call had no momentum).
    """

    w0: jax.Array
    w1: jax.Array
    w2: jax.Array
    m0: jax.Array
    m1: jax.Array
    m2: jax.Array


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def _check_args(
    q, k, v, rates, momentum, weights, initial_state, segment_ids, knobs
) -> dict[str, int]:
    w0, w1, w2 = weights
    check_positive_int("chunk_size", knobs["chunk_size"])
    check_choice("backward", knobs["backward"], BACKWARDS)
    for name in ("use_muon", "weight_norm", "debug"):
        _check_bool(name, knobs[name])
    check_float(q=q, k=k, v=v, momentum=momentum, w0=w0, w1=w1, w2=w2, **rates)
    check_float_dtype("state_dtype", knobs["state_dtype"])
    for name in ("muon_dtype", "backward_dtype"):
        if knobs[name] is not None:
            check_float_dtype(name, knobs[name])
    tokens = ("B", "T", "H", "D")
    specs = [
        ("q", q, tokens),
        ("k", k, tokens),
        ("v", v, tokens),
        *((name, r, ("B", "T", "H")) for name, r in rates.items()),
        ("momentum", momentum, ("B", "T", "H")),
        ("w0", w0, ("H", "Dh", "D")),
        ("w1", w1, ("H", "D", "Dh")),
        ("w2", w2, ("H", "Dh", "D")),
        ("segment_ids", segment_ids, ("B", "T")),
    ]
    if initial_state is not None:
        if not isinstance(initial_state, LaCTState):
            raise ValueError(
                f"initial_state must be a LaCTState (or None), got {type(initial_state).__name__}"
            )
        fields = {"w0": ("H", "Dh", "D"), "w1": ("H", "D", "Dh"), "w2": ("H", "Dh", "D")}
        for i, shape in enumerate(fields.values()):
            for field in (f"w{i}", f"m{i}"):
                value = getattr(initial_state, field)
                specs.append((f"initial_state.{field}", value, ("B", *shape)))
    dims = check_shapes(specs)
    if segment_ids is not None and not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
        raise ValueError(
            f"segment_ids must have an integer dtype, got {jnp.result_type(segment_ids)}"
        )
    check_nonempty("q", q)
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_scan_knobs(knobs["checkpoint_group"], knobs["remat_policy"])
    check_policy_names(knobs["remat_policy"], NAMES, "lact_swiglu")
    return dims


def _check_finite(**arrays: jax.Array | None) -> None:
    """`debug=True`: a `checkify` check per array, naming it, that every value is finite.

    Eagerly a failure raises at once; under `jax.jit` the caller wraps the function with
    `checkify.checkify` and gets the error back (`err.throw()`); an un-functionalised check
    under `jit` is itself an error, so debug mode can never silently pass non-finite rates.
    """
    for name, x in arrays.items():
        if x is not None:
            checkify.check(jnp.all(jnp.isfinite(x)), f"{name} has non-finite values (NaN or inf)")


def lact_swiglu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lr0: jax.Array,
    lr1: jax.Array,
    lr2: jax.Array,
    *,
    w0: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    chunk_size: int = 2048,
    momentum: jax.Array | None = None,
    use_muon: bool = False,
    muon_dtype=None,
    weight_norm: bool = True,
    segment_ids: jax.Array | None = None,
    initial_state: LaCTState | None = None,
    checkpoint_group: int | None = None,
    remat_policy: str | None = None,
    state_dtype=jnp.float32,
    backward: str = "custom",
    backward_dtype=None,
    debug: bool = False,
) -> tuple[jax.Array, LaCTState]:
    """LaCT's SwiGLU fast weight over a sequence: read each chunk, then learn from it.

    Per sample b, head h and chunk i (C tokens), with the state `W^(i)` entering the chunk:
    `o_t = w1 (silu(w0 q_t) * (w2 q_t))` at `W^(i)` for every token t of the chunk, then one
    ascent step on `sum_t lr_t <f(k_t), v_t>` (per-weight rates), optional momentum
    (`M <- G + mean_chunk(beta) M`), optional Muon (Newton-Schulz, 5 steps), `w <- w + G`, and
    optional weight norm (each row back to the norm of the same row of `w0`/`w1`/`w2`).

    Args:
      q, k, v: `[B, T, H, D]`, bf16 or fp32 (one dtype); the compute dtype of every matmul
        (fp32 accumulation). T need not be a multiple of C.
      lr0, lr1, lr2: `[B, T, H]` per-token learning rates of w0, w1, w2 (positive; the layer
        makes them with softplus).
      w0, w2: `[H, Dh, D]`, w1: `[H, D, Dh]`: the slow (initial) fast weights, also the row
        norms the weight norm restores, even when `initial_state` is given.
      chunk_size: C, tokens per update.
      momentum: `[B, T, H]` momentum coefficients beta (in [0, 1), a sigmoid in the layer); each
        chunk uses their mean. None: no momentum.
      use_muon: orthogonalise each update with Newton-Schulz (SPEC 3.2 coefficients).
      muon_dtype: operand dtype of the matmuls that form the update Newton-Schulz
        orthogonalises (the chunk's inner gradients) and of Newton-Schulz itself (the iterate
        stays fp32 between steps). None: the accumulation dtype (fp32 under bf16 compute,
        fp64 under fp64). Newton-Schulz amplifies rounding (it pushes every singular value,
        small noisy ones included, towards 1): with bf16 operands the state after a few chunks
        is 2-6e-2 away from the fp32 op on the same inputs, past SPEC 5's 2e-2 for bf16; with
        the default it is the fp32 computation (~1e-6; `tests/ops/lact/test_lact_muon_dtype.py`).
        "bfloat16" is the fast opt-in; its cost over the default is in benchmarks/RESULTS.md.
      weight_norm: rescale rows after each update (default on).
      segment_ids: `[B, T]` integers, a new document wherever the id changes (None: one
        document). Chunks restart at each document's first token, every document after the
        first starts from `w0, w1, w2` with zero momentum (the first from `initial_state`),
        and the state returned is the last document's: a packed row gives each document the
        outputs it would get alone (`packed.py`).
      initial_state: state to continue from (`LaCTState`, `[B, H, ...]`); None starts every
        sample at `w0, w1, w2` with zero momentum.
      checkpoint_group: G: with `backward="custom"` the forward saves every G-th chunk-boundary
        state and the backward rebuilds the others; with "autodiff" the scan rematerialises
        groups of G chunks (`ttt_jax.ops.core.scan`). None: every state saved / no remat.
      remat_policy: what an autodiff remat group keeps (`ttt_jax.ops.core.remat`; tags in
        `ttt_jax.ops.lact.NAMES`); the custom backward keeps nothing but states either way.
      state_dtype: dtype of the fast weights, momentum and updates (fp32 by default).
      backward: "custom" (the memory-lean `jax.custom_vjp`, `vjp.py`) or "autodiff".
      backward_dtype: operand dtype of the backward's matmuls where the forward's are narrower
        than fp32 (bf16 compute): "bfloat16" rounds each cotangent to bf16 before its matmul
        (fp32 accumulation, `mixed_matmul.py`), the bf16 rate on the 288 of 512 GEMM units of
        a forward+backward that otherwise run as fp32 (TF32 on Hopper). None: plain autodiff
        (fp32 x fp32 products). No effect under fp32 or fp64 compute, nor on the fp32 update
        direction of Muon's default `muon_dtype`. Reverse-mode only when set.
      debug: check that q, k, v, the rates and momentum are finite (`checkify.check`: wrap a
        jitted caller in `checkify.checkify`; eager calls raise at once).

    Returns:
      `o: [B, T, H, D]` in q's dtype, and the `LaCTState` after the last complete chunk (a
      trailing partial chunk is read with it but does not update it).

    Raises:
      ValueError: before tracing, naming the argument: non-positive or non-int chunk size,
        shape mismatches (Dh or D disagreeing between q and the weights included), non-float
        dtypes, unknown `backward` or remat policy, non-bool flags.
    """
    rates = dict(lr0=lr0, lr1=lr1, lr2=lr2)
    knobs = dict(
        chunk_size=chunk_size,
        use_muon=use_muon,
        muon_dtype=muon_dtype,
        weight_norm=weight_norm,
        debug=debug,
        checkpoint_group=checkpoint_group,
        remat_policy=remat_policy,
        state_dtype=state_dtype,
        backward=backward,
        backward_dtype=backward_dtype,
    )
    weights = (w0, w1, w2)
    dims = _check_args(q, k, v, rates, momentum, weights, initial_state, segment_ids, knobs)
    if debug:
        _check_finite(q=q, k=k, v=v, momentum=momentum, **rates)
    sd = jnp.dtype(state_dtype)
    cfg = ChunkConfig(
        chunk_size=chunk_size,
        use_momentum=momentum is not None,
        use_muon=use_muon,
        weight_norm=weight_norm,
        compute_dtype=jnp.dtype(q.dtype),
        muon_dtype=wide_dtype(q.dtype) if muon_dtype is None else jnp.dtype(muon_dtype),
        state_dtype=sd,
        checkpoint_group=checkpoint_group,
        remat_policy=remat_policy,
        # The accumulation dtype itself is plain autodiff (`mixed_matmul` would only repeat it).
        backward_dtype=(
            None
            if backward_dtype is None or jnp.dtype(backward_dtype) == wide_dtype(q.dtype)
            else jnp.dtype(backward_dtype)
        ),
    )
    b = dims["B"]
    slow = (w0, w1, w2)
    if initial_state is None:
        ws = tuple(jnp.broadcast_to(w.astype(sd), (b, *w.shape)) for w in slow)
        ms = tuple(jnp.zeros((b, *w.shape), sd) for w in slow)
    else:
        s = initial_state
        ws = tuple(w.astype(sd) for w in (s.w0, s.w1, s.w2))
        ms = tuple(m.astype(sd) for m in (s.m0, s.m1, s.m2))
    ref_norms = tuple(row_norms(w) for w in slow) if weight_norm else (None, None, None)
    inputs = Chunk(q, k, v, lr0, lr1, lr2, momentum)
    state = (ws, ms if momentum is not None else ())
    if segment_ids is None:
        o, (ws, ms_out) = lact_reads(
            state, inputs, ref_norms, n=dims["T"] // chunk_size, cfg=cfg, backward=backward
        )
    else:
        reset = tuple(w.astype(sd) for w in slow)
        o, (ws, ms_out) = packed_reads(
            state, inputs, ref_norms, reset, segment_ids, cfg=cfg, backward=backward
        )
    if momentum is None:
        ms_out = tuple(jnp.zeros_like(w) for w in ws)
    return o, LaCTState(*ws, *ms_out)


def lact_low_rank_weight(w_left: jax.Array, w_right: jax.Array) -> jax.Array:
    """A low-rank initial fast weight `w_left @ w_right + 0.5 I` per head (SPEC 3.2).

    Args:
      w_left: `[H, R, r]`, w_right: `[H, r, S]` with `r <= min(R, S)`; `I` is the `[R, S]`
        identity (ones on the main diagonal), so `[H, Dh, D]` factors give a w0 or w2.

    Returns:
      `[H, R, S]` in the promoted dtype of the factors (fp32 matmul at HIGHEST precision, so
      the weight is the same on every backend).

    Raises:
      ValueError: naming the argument when the shapes disagree or `r > min(R, S)`.
    """
    check_float(w_left=w_left, w_right=w_right)
    dims = check_shapes(
        [("w_left", w_left, ("H", "R", "r")), ("w_right", w_right, ("H", "r", "S"))]
    )
    if dims["r"] > min(dims["R"], dims["S"]):
        raise ValueError(
            f"w_left/w_right rank r={dims['r']} must be <= min(rows, cols) = "
            f"min({dims['R']}, {dims['S']}): got w_left {w_left.shape}, w_right {w_right.shape}"
        )
    dtype = jnp.result_type(w_left, w_right)
    product = matmul("hrk,hks->hrs", w_left, w_right, dtype).astype(dtype)
    return product + LOW_RANK_IDENTITY * jnp.eye(dims["R"], dims["S"], dtype=dtype)
