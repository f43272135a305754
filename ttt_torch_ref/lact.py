"""LaCT: large-chunk SwiGLU fast weights (Zhang et al. 2025, "Test-Time Training Done Right").

SPEC 3.2. Per sample and head the fast weights are `w0, w2: [Dh, D]` and `w1: [D, Dh]`, and

    f(x) = w1 (silu(w0 x) * (w2 x))                         (x a column [D])

The sequence is cut into chunks of C tokens. For chunk i, with the weights W^(i) as they stand
before it:

    apply:   O_i = f_{W^(i)}(Q_i)
    grad:    G_j = d/dw_j  sum_t lr_j[t] <f(k_t), v_t>      one per weight, each with its own rate
    momentum (optional): M_j <- G_j + mean_chunk(beta) * M_j,  G_j <- M_j
    muon (optional):     G_j <- NewtonSchulz5(G_j)
    step:                w_j <- w_j + G_j                    (ascent on the dot product)
    weight norm (optional): every row of w_j rescaled to the norm of the same row of the slow
                         weight passed as the `w0` / `w1` / `w2` argument.

A trailing partial chunk is applied but does not update the state. The inner gradient is taken
with `torch.autograd.grad(create_graph=True)`, not with the closed form of the SPEC (the self
checks compare the two), so everything is differentiable with respect to every input.
Shapes follow the SPEC API: q, k, v `[B, T, H, D]`, rates and momentum `[B, T, H]`, w0 / w2
`[H, Dh, D]`, w1 `[H, D, Dh]`. Inside, tensors are `[B, H, T, D]` and weights `[B, H, ...]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import causal_attention
from .common import check_shape, rms_norm, rope

# Per-step (a, b, c) of the quintic Newton-Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T.
NEWTON_SCHULZ_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
NS_EPS = 1e-7
WEIGHT_NORM_EPS = 1e-5


@dataclass
class LaCTState:
    """Per-sample fast weights after the last complete chunk, and the momentum buffers.

    Attributes:
        w0, w2: [B, H, Dh, D]; w1: [B, H, D, Dh].
        m0, m1, m2: momentum buffers, shaped like w0, w1, w2 (zeros when no momentum was used).
    """

    w0: Tensor
    w1: Tensor
    w2: Tensor
    m0: Tensor
    m1: Tensor
    m2: Tensor


def swiglu_fast_weight(w0: Tensor, w1: Tensor, w2: Tensor, x: Tensor) -> Tensor:
    """f(x) = w1 (silu(w0 x) * (w2 x)) on rows: x [B, H, n, D] -> [B, H, n, D]."""
    hidden = F.silu(x @ w0.mT) * (x @ w2.mT)  # [B, H, n, Dh]
    return hidden @ w1.mT


def inner_gradients(
    w: tuple[Tensor, Tensor, Tensor], k: Tensor, v: Tensor, lrs: tuple[Tensor, Tensor, Tensor]
) -> list[Tensor]:
    """G_j = d/dw_j sum_t lr_j[t] <f_w(k_t), v_t> for j = 0, 1, 2, by autograd.

    Samples and heads are independent, so the gradient of the sum over them is every
    sample's own gradient.

    Args:
        w: (w0, w1, w2), [B, H, Dh, D], [B, H, D, Dh], [B, H, Dh, D].
        k, v: [B, H, n, D], the chunk's keys and values.
        lrs: (lr0, lr1, lr2), each [B, H, n].

    Returns:
        [G0, G1, G2], shaped like w, differentiable (create_graph) w.r.t. w, k, v and the rates.
    """
    outer = torch.is_grad_enabled()  # False under torch.no_grad(): inference only
    with torch.enable_grad():
        # A weight that needs no outer gradient still needs a graph for the inner one.
        w = [wj if outer and wj.requires_grad else wj.detach().requires_grad_(True) for wj in w]
        dots = (swiglu_fast_weight(*w, k) * v).sum(-1)  # [B, H, n]: <f(k_t), v_t>
        grads = [
            torch.autograd.grad((lr * dots).sum(), wj, retain_graph=True, create_graph=outer)[0]
            for lr, wj in zip(lrs, w, strict=True)
        ]
    return grads if outer else [g.detach() for g in grads]


def newton_schulz5(g: Tensor) -> Tensor:
    """The Muon orthogonalisation of each matrix in g ([..., m, n]), SPEC 3.2 coefficients."""
    x = g / (torch.linalg.matrix_norm(g, keepdim=True) + NS_EPS)
    transposed = g.shape[-2] > g.shape[-1]
    if transposed:
        x = x.mT
    for a, b, c in NEWTON_SCHULZ_COEFFS:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


def renormalise_rows(w: Tensor, w_slow: Tensor) -> Tensor:
    """w / (||w_row|| + 1e-5) * ||w_slow_row||, rows along the last axis; w_slow [H, m, n]."""
    return w / (w.norm(dim=-1, keepdim=True) + WEIGHT_NORM_EPS) * w_slow.norm(dim=-1, keepdim=True)


def lact_swiglu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr0: Tensor,
    lr1: Tensor,
    lr2: Tensor,
    *,
    w0: Tensor,
    w1: Tensor,
    w2: Tensor,
    chunk_size: int = 2048,
    momentum: Tensor | None = None,
    use_muon: bool = False,
    weight_norm: bool = True,
    initial_state: LaCTState | None = None,
) -> tuple[Tensor, LaCTState]:
    """LaCT SwiGLU fast-weight op, apply-then-update per chunk (module docstring).

    Args:
        q, k, v: [B, T, H, D] queries, keys, values.
        lr0, lr1, lr2: [B, T, H] per-token rates of w0, w1, w2.
        w0, w2: [H, Dh, D]; w1: [H, D, Dh]. The slow weights: the start state (unless
            `initial_state` is given) and always the row-norm targets of the weight norm.
        chunk_size: C, tokens per update.
        momentum: optional [B, T, H] beta; each chunk uses its mean over the chunk.
        use_muon: orthogonalise each update by Newton-Schulz (5 steps).
        weight_norm: rescale the rows of the updated weights to the slow weights' row norms.
        initial_state: optional LaCTState to continue from (weights and momentum buffers).

    Returns:
        o: [B, T, H, D] in q's dtype, o_t = f_{W^(i)}(q_t) for t in chunk i.
        state: LaCTState after the last complete chunk; without momentum its buffers are
            zeros (SPEC 3.2), whatever the initial state held.
    """
    Bsz, T, H, D = q.shape
    Dh = w0.shape[1]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for name, x in (("k", k), ("v", v)):
        check_shape(name, x, (Bsz, T, H, D))
    for name, x in (("lr0", lr0), ("lr1", lr1), ("lr2", lr2), ("momentum", momentum)):
        if x is not None:
            check_shape(name, x, (Bsz, T, H))
    check_shape("w0", w0, (H, Dh, D))
    check_shape("w1", w1, (H, D, Dh))
    check_shape("w2", w2, (H, Dh, D))
    if initial_state is not None:
        for name, shape in (("0", (Dh, D)), ("1", (D, Dh)), ("2", (Dh, D))):
            check_shape(
                f"initial_state.w{name}", getattr(initial_state, f"w{name}"), (Bsz, H, *shape)
            )
            check_shape(
                f"initial_state.m{name}", getattr(initial_state, f"m{name}"), (Bsz, H, *shape)
            )

    # Compute and state in fp32 (fp64 for fp64 inputs); outputs go back in q's dtype.
    out_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)

    def heads_first(x: Tensor) -> Tensor:  # [B, T, H, ...] -> [B, H, T, ...]
        return x.to(dtype).transpose(1, 2)

    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    rates = [heads_first(lr) for lr in (lr0, lr1, lr2)]
    beta = heads_first(momentum) if momentum is not None else None
    slow = [w.to(dtype) for w in (w0, w1, w2)]

    if initial_state is None:
        w = [s.expand(Bsz, *s.shape) for s in slow]
        m = [torch.zeros_like(wj) for wj in w]
    else:
        w = [getattr(initial_state, f"w{j}").to(dtype) for j in range(3)]
        m = [getattr(initial_state, f"m{j}").to(dtype) for j in range(3)]

    outputs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        outputs.append(swiglu_fast_weight(*w, q[:, :, start:end]))
        if end - start < chunk_size:
            break  # a trailing partial chunk is read, never learned from
        G = inner_gradients(
            w, k[:, :, start:end], v[:, :, start:end], [lr[:, :, start:end] for lr in rates]
        )
        if beta is not None:
            beta_i = beta[:, :, start:end].mean(dim=2)[..., None, None]  # [B, H, 1, 1]
            m = [g + beta_i * mj for g, mj in zip(G, m, strict=True)]
            G = list(m)
        if use_muon:
            G = [newton_schulz5(g) for g in G]
        w = [wj + g for wj, g in zip(w, G, strict=True)]
        if weight_norm:
            w = [renormalise_rows(wj, s) for wj, s in zip(w, slow, strict=True)]

    o = torch.cat(outputs, dim=2) if outputs else q.new_zeros(Bsz, H, 0, D)
    if beta is None:
        m = [torch.zeros_like(wj) for wj in w]
    state = LaCTState(*w, *m)
    return o.transpose(1, 2).to(out_dtype), state


# --- the layer -------------------------------------------------------------------------------


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y: the bias that makes a rate start at y."""
    return math.log(math.expm1(y))


@dataclass(frozen=True)
class LaCTLayerConfigRef:
    """Configuration of LaCTLayerRef.

    Attributes:
        d_model: d, model width.
        num_heads: attention heads of the sliding-window branch (d divisible by it).
        num_fw_heads: fast-weight heads of the TTT branch, each D = d / num_fw_heads wide.
        fw_hidden: Dh, hidden width of each head's SwiGLU fast weight (None: D).
        window: sliding-window size of the attention branch (keys per query, itself included).
        chunk_size: C, tokens per fast-weight update.
        rank: r of the low-rank slow weights w0 = W_left @ W_right + 0.5 I (and w2).
        base_lr: the rates' value at init, softplus(b) = base_lr.
        use_momentum: momentum from sigmoid(x W_m).
        use_muon: Newton-Schulz orthogonalised updates.
        weight_norm: rescale the fast weights' rows to the slow weights' row norms.
        learnable_scale: multiply the normalised TTT output by silu(x W_s), one scale per head.
        rope_theta: RoPE base of both branches.
        norm_eps: epsilon of the RMSNorm (per head) on the TTT output.
        operand_dtype: None computes everything in the parameters' dtype. A dtype (bf16)
            mirrors a mixed-precision layer's rounding points, so that a bf16 layer is compared
            on the values it really feeds its op: x and the weights enter each projection
            rounded to it, the projections q, k, v leave it rounded, and the fast-weight heads
            reach the op rounded; the arithmetic stays in the parameters' dtype.
    """

    d_model: int
    num_heads: int
    num_fw_heads: int
    fw_hidden: int | None = None
    window: int = 2048
    chunk_size: int = 2048
    rank: int = 32
    base_lr: float = 1e-3
    use_momentum: bool = True
    use_muon: bool = False
    weight_norm: bool = True
    learnable_scale: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    operand_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "num_heads", "num_fw_heads", "window", "chunk_size", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_heads", "num_fw_heads"):
            if self.d_model % getattr(self, name) or (self.d_model // getattr(self, name)) % 2:
                raise ValueError(
                    f"d_model={self.d_model} / {name}={getattr(self, name)} must be an even integer"
                )
        if self.fw_hidden is None:
            object.__setattr__(self, "fw_hidden", self.d_model // self.num_fw_heads)
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")

    @property
    def fw_head_dim(self) -> int:
        return self.d_model // self.num_fw_heads


def l2_normalise(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / max(||x||, eps) over the last axis."""
    return x / torch.clamp(x.norm(dim=-1, keepdim=True), min=eps)


class LaCTLayerRef(nn.Module):
    """LaCT block mixer, SPEC 3.2 "Layer":

        q, k, v = split(x W_qkv)                                       each [B, T, d]
        attn    = SlidingWindowAttn(RoPE(q), RoPE(k), v) (num_heads heads, window)
        q', k', v' = (q, k, v) * ttt_scale + ttt_offset                 per channel
        q', k', v' -> fast-weight heads [B, T, H, D], silu; q', k' L2-normalised, then RoPE
        lr_j    = softplus(x W_lr[:, j] + b_lr[j])                      [B, T, H], j = 0, 1, 2
        beta    = sigmoid(x W_m)                                        [B, T, H] (momentum)
        ttt     = RMSNorm_per_head(lact_swiglu(q', k', v', ...))        (* silu(x W_s) per head)
        y       = (attn + ttt) W_o

    Parameters (math convention, a projection is x @ W):
        W_qkv [d, 3d] (columns q | k | v); W_o [d, d];
        ttt_scale, ttt_offset [3, d] (rows q, k, v);
        W_lr [d, 3, H], b_lr [3, H]; W_m [d, H] (use_momentum); W_s [d, H] (learnable_scale);
        w0_left, w2_left [H, Dh, r], w0_right, w2_right [H, r, D]; w1 [H, D, Dh];
        ttt_norm [H, D] (RMSNorm scale).

    The slow fast-weight start is w0 = w0_left @ w0_right + 0.5 I_{Dh x D} (and w2), w1 dense.

    Args:
        config: LaCTLayerConfigRef.
        generator: optional torch.Generator for the random initialisation.
    """

    def __init__(self, config: LaCTLayerConfigRef, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        d, H, D, Dh, r = (
            config.d_model,
            config.num_fw_heads,
            config.fw_head_dim,
            config.fw_hidden,
            config.rank,
        )

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(std * torch.randn(*shape, generator=generator))

        self.W_qkv = normal(d, 3 * d, std=1 / math.sqrt(d))
        self.W_o = normal(d, d, std=1 / math.sqrt(d))
        self.ttt_scale = nn.Parameter(torch.ones(3, d))
        self.ttt_offset = nn.Parameter(torch.zeros(3, d))
        self.W_lr = normal(d, 3, H, std=0.02)
        self.b_lr = nn.Parameter(torch.full((3, H), inverse_softplus(config.base_lr)))
        if config.use_momentum:
            self.W_m = normal(d, H, std=0.02)
        if config.learnable_scale:
            self.W_s = normal(d, H, std=0.02)
        self.w0_left = normal(H, Dh, r, std=1 / math.sqrt(D))
        self.w0_right = normal(H, r, D, std=1 / math.sqrt(D))
        self.w2_left = normal(H, Dh, r, std=1 / math.sqrt(D))
        self.w2_right = normal(H, r, D, std=1 / math.sqrt(D))
        self.w1 = normal(H, D, Dh, std=1 / math.sqrt(Dh))
        self.ttt_norm = nn.Parameter(torch.ones(H, D))

    def slow_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(w0, w1, w2): [H, Dh, D], [H, D, Dh], [H, Dh, D], the low-rank-plus-0.5-I starts."""
        cfg = self.config
        eye = 0.5 * torch.eye(cfg.fw_hidden, cfg.fw_head_dim, dtype=self.w1.dtype)
        w0 = self.w0_left @ self.w0_right + eye
        w2 = self.w2_left @ self.w2_right + eye
        return w0, self.w1, w2

    def forward(
        self, x: Tensor, initial_state: LaCTState | None = None
    ) -> tuple[Tensor, LaCTState]:
        """Apply the layer.

        Args:
            x: [B, T, d].
            initial_state: optional fast-weight state to start the TTT branch from (the
                attention branch always starts fresh; positions start at 0).

        Returns:
            y: [B, T, d], and the TTT branch's LaCTState after its last complete chunk.
        """
        cfg = self.config
        Bsz, T, d = x.shape
        positions = torch.arange(T)
        r = self._round
        q, k, v = r(r(x) @ r(self.W_qkv)).split(d, dim=-1)

        Ha = cfg.num_heads
        attn = causal_attention(
            rope(q.reshape(Bsz, T, Ha, d // Ha), positions, cfg.rope_theta),
            rope(k.reshape(Bsz, T, Ha, d // Ha), positions, cfg.rope_theta),
            v.reshape(Bsz, T, Ha, d // Ha),
            window=cfg.window,
        ).reshape(Bsz, T, d)

        H, D = cfg.num_fw_heads, cfg.fw_head_dim
        fq, fk, fv = (
            F.silu((t * self.ttt_scale[j] + self.ttt_offset[j]).reshape(Bsz, T, H, D))
            for j, t in enumerate((q, k, v))
        )
        fq = r(rope(l2_normalise(fq), positions, cfg.rope_theta))
        fk = r(rope(l2_normalise(fk), positions, cfg.rope_theta))
        fv = r(fv)
        lrs = F.softplus(torch.einsum("btd,djh->btjh", r(x), r(self.W_lr)) + self.b_lr)
        beta = torch.sigmoid(r(x) @ r(self.W_m)) if cfg.use_momentum else None
        w0, w1, w2 = self.slow_weights()
        o, state = lact_swiglu(
            fq,
            fk,
            fv,
            lrs[:, :, 0],
            lrs[:, :, 1],
            lrs[:, :, 2],
            w0=w0,
            w1=w1,
            w2=w2,
            chunk_size=cfg.chunk_size,
            momentum=beta,
            use_muon=cfg.use_muon,
            weight_norm=cfg.weight_norm,
            initial_state=initial_state,
        )
        o = rms_norm(o, self.ttt_norm, cfg.norm_eps)
        if cfg.learnable_scale:
            o = o * F.silu(r(x) @ r(self.W_s))[..., None]
        return r(attn + o.reshape(Bsz, T, d)) @ r(self.W_o), state

    def _round(self, t: Tensor) -> Tensor:
        """`t` rounded to `config.operand_dtype` and back (the identity without one)."""
        od = self.config.operand_dtype
        return t if od is None else t.to(od).to(t.dtype)
