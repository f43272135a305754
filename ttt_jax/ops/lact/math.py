"""The per-chunk math of LaCT (SPEC 3.2): read the SwiGLU fast weight, take one inner step.

Per sample b and head h the fast weight is `w0, w2: [Dh, D]`, `w1: [D, Dh]` and reads
`f(x) = w1 (silu(w0 x) * (w2 x))`. One chunk of C tokens (`K, V, Q: [C, D]`, per-token rates
`lr0, lr1, lr2: [C]`) first reads the state it starts from, then updates it:

    O     = f_W(Q)                                       apply (state before the chunk)
    A     = K w0^T,  Bm = K w2^T,  P = V w1              [C, Dh], token-major
    G1    = V^T diag(lr1) (silu(A) * Bm)                 [D, Dh]
    G0    = (P * Bm * silu'(A) * lr0)^T K                [Dh, D]
    G2    = (P * silu(A) * lr2)^T K                      [Dh, D]

the gradient of `sum_t lr_t <f(k_t), v_t>` (each weight with its own rate), taken as an ascent
step. SPEC 3.2 writes `A = w0 K^T` ([Dh, C]); the token-major transposes here are the same
numbers. Then, in order: momentum `M <- G + mean_chunk(beta) M; G <- M`, Muon
`G <- NewtonSchulz5(G)`, the step `w <- w + G`, and the weight norm that scales each row of `w`
back to the norm of the same row of the slow weights.

Layout: every function batches all samples and heads in one einsum. Token arrays are sliced
from the op's `[B, T, H, ...]` inputs as `[B, C, H, ...]` and never transposed as a whole; the
chunk's activations are `[B, H, C, Dh]` (batch dims leading, as the matmul units want them).
Matmuls take their operands in the compute dtype and accumulate in fp32; the state, the inner
gradients and the Newton-Schulz iterate are fp32 (`state_dtype`). Their backward is plain
autodiff (fp32 cotangent products), or with `ChunkConfig.backward_dtype` bf16 products
(`mixed_matmul.py`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ttt_jax.ops.core.numerics import wide_dtype
from ttt_jax.ops.lact.mixed_matmul import mixed_matmul

# Newton-Schulz iteration of Muon: per-step (a, b, c) of `X <- a X + (b A + c A^2) X`,
# `A = X X^T` (SPEC 3.2). Tuned so 5 steps push every singular value near 1.
NS_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
NS_EPS = 1e-7
WEIGHT_NORM_EPS = 1e-5
# checkpoint_name tags of the chunk step, usable in `save_names:` remat policies of the
# autodiff backward: the inner gradients (before momentum / Muon) and the apply's hidden layer.
NAMES = ("lact_grad", "lact_hidden")


class ChunkConfig(NamedTuple):
    """Static settings of one `lact_swiglu` call (hashable: a `custom_vjp` nondiff argument)."""

    chunk_size: int
    use_momentum: bool
    use_muon: bool
    weight_norm: bool
    compute_dtype: jnp.dtype
    muon_dtype: jnp.dtype
    state_dtype: jnp.dtype
    checkpoint_group: int | None
    remat_policy: str | None
    # Operand dtype of the backward's matmuls where the forward's are bf16 (`mixed_matmul`);
    # None: plain autodiff (fp32 cotangent products).
    backward_dtype: jnp.dtype | None = None


class Chunk(NamedTuple):
    """Token inputs of one chunk (or, in the op, of the whole sequence).

    `q, k, v: [B, C, H, D]` in the compute dtype; `lr0, lr1, lr2: [B, C, H]`; `beta: [B, C, H]`
    momentum coefficients, or None without momentum.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    lr0: jax.Array
    lr1: jax.Array
    lr2: jax.Array
    beta: jax.Array | None


# The state carried across chunks: `(ws, ms)` with `ws = (w0, w1, w2)` (`[B, H, Dh, D]`,
# `[B, H, D, Dh]`, `[B, H, Dh, D]`) and `ms` the momentum buffers of the same shapes, or `()`
# without momentum (no zeros are carried through the scan).
FastState = tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]


def _stack02(w0: jax.Array, w2: jax.Array) -> jax.Array:
    """`[B, H, 2 Dh, D]`: w0 above w2. `x w0^T` and `x w2^T` read the same x, so one matmul with
    twice the columns computes both (fewer, larger matmuls: at Dh = 384 a single one is small
    for the GPU's matmul units), and in the backward their x-cotangents come out summed."""
    return jnp.concatenate([w0, w2], axis=-2)


def apply_fast_weights(ws: tuple[jax.Array, ...], q: jax.Array, cd, bd=None) -> jax.Array:
    """`f_W(q)` per token: `q: [B, L, H, D]` -> `[B, L, H, D]` fp32 (any L, no mixing over L).
    `bd`: operand dtype of the backward's matmuls (`mixed_matmul`; None: plain autodiff)."""
    w0, w1, w2 = ws
    dh = w0.shape[-2]
    ab = mixed_matmul("bchd,bhed->bhce", q, _stack02(w0, w2), cd, bd)
    hidden = checkpoint_name(jax.nn.silu(ab[..., :dh]) * ab[..., dh:], "lact_hidden")
    return mixed_matmul("bhce,bhde->bchd", hidden, w1, cd, bd)


def _wide(x: jax.Array) -> jax.Array:
    """`x` in fp32, or wider if it already is (bf16 rates and norms are too coarse)."""
    return x.astype(wide_dtype(x.dtype))


def _rate(lr: jax.Array) -> jax.Array:
    """`[B, C, H]` -> `[B, H, C, 1]` fp32, to scale `[B, H, C, Dh]` activations per token."""
    return jnp.swapaxes(_wide(lr), 1, 2)[..., None]


def inner_grads(ws, k, v, lr0, lr1, lr2, cd, bd=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The chunk's ascent direction `(G0, G1, G2)` (module docstring), fp32, shaped like `ws`.

    Args:
      ws: `(w0, w1, w2)`, `[B, H, Dh, D]`, `[B, H, D, Dh]`, `[B, H, Dh, D]`.
      k, v: `[B, C, H, D]`.
      lr0, lr1, lr2: `[B, C, H]` per-token rates of w0, w1, w2.
      cd: compute dtype of the matmuls.
      bd: operand dtype of their backward (`mixed_matmul`; None: plain autodiff).
    """
    w0, w1, w2 = ws
    dh = w0.shape[-2]
    ab = mixed_matmul("bchd,bhed->bhce", k, _stack02(w0, w2), cd, bd)
    a, bm = ab[..., :dh], ab[..., dh:]
    p = mixed_matmul("bchd,bhde->bhce", v, w1, cd, bd)
    sig = jax.nn.sigmoid(a)
    silu_a = a * sig
    # silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))).
    d0 = p * bm * sig * (1.0 + a * (1.0 - sig)) * _rate(lr0)
    d2 = p * silu_a * _rate(lr2)
    g1 = mixed_matmul("bchd,bhce->bhde", v, silu_a * bm * _rate(lr1), cd, bd)
    # G0 and G2 both contract with K: one matmul (see `_stack02`). Stacked on a new axis, not
    # concatenated along Dh: XLA:CPU fuses a concatenated bf16 operand into a dot it cannot run
    # ("Unsupported element type for DotThunk: BF16 x BF16 = F32", jaxlib 0.10.2, B > 1).
    g02 = mixed_matmul("bhzce,bchd->bhzed", jnp.stack([d0, d2], axis=2), k, cd, bd)
    return checkpoint_name((g02[:, :, 0], g1, g02[:, :, 1]), "lact_grad")


def newton_schulz5(g: jax.Array, cd, bd=None) -> jax.Array:
    """Muon's orthogonalisation of `g: [..., R, S]` (fp32 in, fp32 out), per matrix.

    Works on the wide orientation (`R <= S`, transposing otherwise, as `NS(X^T) = NS(X)^T`) so
    that `X X^T` is the smaller Gram matrix; the iterate stays fp32 between steps, its matmuls
    run in `cd` (their backward in `bd`, `mixed_matmul`).
    """
    tall = g.shape[-2] > g.shape[-1]
    x = jnp.swapaxes(g, -1, -2) if tall else g
    norm = jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))
    x = x / (norm + NS_EPS)
    for a, b, c in NS_COEFFS:
        gram = mixed_matmul("...ij,...kj->...ik", x, x, cd, bd)
        poly = b * gram + c * mixed_matmul("...ij,...jk->...ik", gram, gram, cd, bd)
        x = a * x + mixed_matmul("...ij,...jk->...ik", poly, x, cd, bd)
    return jnp.swapaxes(x, -1, -2) if tall else x


def orthogonalise(gs: tuple[jax.Array, ...], cd, bd=None) -> tuple[jax.Array, ...]:
    """`newton_schulz5` of the three updates (`[B, H, Dh, D]`, `[B, H, D, Dh]`, `[B, H, Dh, D]`)
    as one batch: each in its wide orientation (the same `[min, max]` shape for all three),
    stacked, so every Newton-Schulz step is 3 matmul calls rather than 9."""
    flip = [g.shape[-2] > g.shape[-1] for g in gs]
    wide = [jnp.swapaxes(g, -1, -2) if f else g for g, f in zip(gs, flip, strict=True)]
    out = newton_schulz5(jnp.stack([_wide(g) for g in wide], axis=2), cd, bd)  # [B, H, 3, r, s]
    return tuple(
        jnp.swapaxes(out[:, :, i], -1, -2) if f else out[:, :, i] for i, f in enumerate(flip)
    )


def row_norms(w: jax.Array) -> jax.Array:
    """Euclidean norm of every row (over the last axis), fp32: `[..., R, S]` -> `[..., R]`."""
    w = _wide(w)
    return jnp.sqrt(jnp.sum(w * w, axis=-1))


def renormalise_rows(w: jax.Array, target: jax.Array) -> jax.Array:
    """Scales each row of `w: [B, H, R, S]` to norm `target: [H, R]` (eps 1e-5, SPEC 3.2)."""
    return w / (row_norms(w)[..., None] + WEIGHT_NORM_EPS) * target[None, :, :, None]


def update_state(state: FastState, chunk: Chunk, ref_norms, cfg: ChunkConfig) -> FastState:
    """One inner step on the chunk's keys and values: the state after the chunk.

    Args:
      state: `(ws, ms)` before the chunk (state dtype).
      chunk: the chunk's tokens (`Chunk`, `[B, C, H, ...]`).
      ref_norms: `(n0, n1, n2)`, row norms of the slow weights (`[H, Dh]`, `[H, D]`, `[H, Dh]`),
        the targets of the weight norm (unused without it).
      cfg: static settings.
    """
    ws, ms = state
    sd = cfg.state_dtype
    # Under Muon the whole update direction is formed in `muon_dtype`, not only Newton-Schulz:
    # NS pushes every singular value towards 1, so the bf16 rounding of the gradient's operands
    # (the fp32 state and the activations cast to bf16) lands in the state amplified. Measured
    # with bf16 q, k, v against the fp32 op on the same values
    # (tests/ops/lact/test_lact_muon_dtype.py): state error 2-5e-2 with bf16 gradients and NS,
    # 1-5e-2 with fp32 NS alone, ~2e-6 with both.
    gd = cfg.muon_dtype if cfg.use_muon else cfg.compute_dtype
    bd = cfg.backward_dtype
    gs = inner_grads(ws, chunk.k, chunk.v, chunk.lr0, chunk.lr1, chunk.lr2, gd, bd)
    if cfg.use_momentum:
        beta = jnp.mean(_wide(chunk.beta), axis=1)[:, :, None, None]  # [B, H, 1, 1]
        ms = tuple((g + beta * m).astype(sd) for g, m in zip(gs, ms, strict=True))
        gs = ms
    if cfg.use_muon:
        gs = orthogonalise(gs, cfg.muon_dtype, bd)
    ws = tuple((w + g).astype(sd) for w, g in zip(ws, gs, strict=True))
    if cfg.weight_norm:
        ws = tuple(renormalise_rows(w, n).astype(sd) for w, n in zip(ws, ref_norms, strict=True))
    return ws, ms


def chunk_step(
    state: FastState, chunk: Chunk, ref_norms, cfg: ChunkConfig
) -> tuple[FastState, jax.Array]:
    """Apply-then-update of one complete chunk: `(state after, o: [B, C, H, D] in q's dtype)`."""
    o = apply_fast_weights(state[0], chunk.q, cfg.compute_dtype, cfg.backward_dtype)
    o = o.astype(chunk.q.dtype)
    return update_state(state, chunk, ref_norms, cfg), o
