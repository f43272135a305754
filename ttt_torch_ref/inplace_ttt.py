"""In-Place TTT (ICLR 2026): the gated MLP's down projection is the fast weight. SPEC 3.3.

In a gated MLP `Z = silu(x W_gate) * (x W_up)` ([T, F]) and `O = Z W_down^T` (W_down [d, F]),
only W_down learns at test time. Per document, the sequence is cut into chunks of C tokens; for
chunk i (Z_i [C, F], X0_i [C, d] the target source):

    V_i     = conv(X0_i) @ W_target           (depthwise conv over time, inside the chunk only)
    Delta_i = V_i^T Z_i                        ([d, F]; optionally clipped to ||.||_F <= tau)
    S_i     = sum_{j < i} Delta_j              (EXCLUSIVE prefix: chunk i never sees itself)
    W_i     = W_start + eta * S_i
    O_i     = Z_i W_i^T

This module loops over samples, documents and chunks and materialises every W_i. It is slow on
purpose: it is the independent reference that the JAX scan (which never forms the W_i) is checked
against. Everything is plain autograd, so outputs and states are differentiable with respect to
every input, `eta` (when a tensor) and `initial_state`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONV_MODES = ("centered", "causal_next")
TARGET_SOURCES = ("input", "embedding")
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class InPlaceTTTState:
    """Per-sample fast weight of In-Place TTT.

    Attributes:
        w_down: [B, d, F], the down projection after the last complete chunk of the last document,
            applied as Z @ w_down^T.
    """

    w_down: Tensor


def chunk_conv(x: Tensor, kernel: Tensor, conv_mode: str) -> Tensor:
    """Depthwise conv over the time axis of ONE chunk, zero outside it.

    centered:    out[t] = sum_j kernel[j] * x[t + j - K//2]   (K = 5 in the official code)
    causal_next: out[t] = sum_j kernel[j] * x[t + j]          (K = 2: tokens t and t + 1)

    Args:
        x: [n, d], the tokens of the chunk that are present (n <= C).
        kernel: [K, d], one filter per channel.
        conv_mode: "centered" or "causal_next".

    Returns:
        [n, d].
    """
    n, K = x.shape[0], kernel.shape[0]
    shift = K // 2 if conv_mode == "centered" else 0
    # Zero-pad the chunk so that padded[t + j] = x[t + j - shift], zero outside the chunk.
    padded = torch.cat([x.new_zeros(shift, x.shape[1]), x, x.new_zeros(K - 1 - shift, x.shape[1])])
    return sum(kernel[j] * padded[j : j + n] for j in range(K))


def clip_frobenius(delta: Tensor, tau: float | None) -> Tensor:
    """Scale `delta` down to Frobenius norm tau if it is larger; identity when tau is None."""
    if tau is None:
        return delta
    norm = torch.linalg.matrix_norm(delta)
    # tau / max(norm, tau) is 1 below the threshold and tau / norm above, without ever dividing
    # by a zero norm.
    return delta * (tau / torch.clamp(norm, min=tau))


def inplace_ttt_document(
    z: Tensor,
    target: Tensor,
    *,
    w_start: Tensor,
    w_target: Tensor,
    conv_kernel: Tensor,
    eta: float | Tensor,
    chunk_size: int,
    conv_mode: str = "centered",
    clip_tau: float | None = None,
) -> tuple[Tensor, Tensor]:
    """In-Place TTT on one document of one sample, chunks counted from its first token.

    Args:
        z: [n, F], the gated MLP hidden states of the document.
        target: [n, d], the target source X0 (token embeddings or MLP input).
        w_start: [d, F], the fast weight before the first chunk.
        w_target: [d, d], applied as conv(X0) @ w_target.
        conv_kernel: [K, d].
        eta: the TTT learning rate (float or 0-d tensor).
        chunk_size: C.
        conv_mode: "centered" or "causal_next".
        clip_tau: optional Frobenius clip of each chunk's Delta.

    Returns:
        o: [n, d], O_i = Z_i W_i^T chunk by chunk.
        w_end: [d, F], W_start + eta * (sum of the Deltas of every complete chunk). A trailing
            partial chunk is read with the weight of the complete chunks before it and does not
            update it.
    """
    n = z.shape[0]
    outputs = []
    S = torch.zeros_like(w_start)
    for start in range(0, n, chunk_size):
        Z_i = z[start : start + chunk_size]
        W_i = w_start + eta * S
        outputs.append(Z_i @ W_i.T)
        if Z_i.shape[0] == chunk_size:
            V_i = chunk_conv(target[start : start + chunk_size], conv_kernel, conv_mode) @ w_target
            S = S + clip_frobenius(V_i.T @ Z_i, clip_tau)
    o = torch.cat(outputs, dim=0) if outputs else z.new_zeros(0, w_start.shape[0])
    return o, w_start + eta * S


def segments(ids: Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of equal ids in a 1-D tensor: a document per run."""
    ids = ids.tolist()
    bounds = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def inplace_ttt(
    z: Tensor,
    target: Tensor,
    *,
    w_down: Tensor,
    w_target: Tensor,
    conv_kernel: Tensor,
    eta: float | Tensor,
    chunk_size: int,
    conv_mode: str = "centered",
    clip_tau: float | None = None,
    segment_ids: Tensor | None = None,
    initial_state: InPlaceTTTState | None = None,
) -> tuple[Tensor, InPlaceTTTState]:
    """In-Place TTT over a batch of (possibly packed) sequences, SPEC 3.3.

    Args:
        z: [B, T, F], the gated MLP hidden states Z = act(x W_gate) * (x W_up).
        target: [B, T, d], the target source X0 (token embeddings or the MLP input).
        w_down: [d, F], the slow down projection: the start weight of every document (except the
            first of each sample when `initial_state` is given).
        w_target: [d, d], the target projection, V = conv(X0) @ w_target.
        conv_kernel: [K, d], the depthwise conv over time (K = 5 centered, K = 2 causal_next).
        eta: the TTT learning rate, a Python float or a 0-d tensor (differentiable).
        chunk_size: C, tokens per chunk.
        conv_mode: "centered" or "causal_next" (see `chunk_conv`).
        clip_tau: if set, each chunk's Delta is scaled down to Frobenius norm tau when larger.
        segment_ids: optional [B, T] integers; a new document starts wherever the id changes.
            Each document is processed as if alone: chunks restart at its first token and the conv
            never crosses its edges.
        initial_state: optional state whose w_down [B, d, F] replaces `w_down` as the start of the
            first document of each sample.

    Returns:
        o: [B, T, d] in z's dtype.
        state: InPlaceTTTState with w_down [B, d, F], the fast weight of each sample's last
            document after its last complete chunk.
    """
    B, T, Fdim = z.shape
    d = w_down.shape[0]
    if conv_mode not in CONV_MODES:
        raise ValueError(f"conv_mode must be one of {CONV_MODES}, got {conv_mode!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if target.shape != (B, T, d):
        raise ValueError(f"target must be [B, T, d] = {(B, T, d)}, got {tuple(target.shape)}")
    if w_down.shape != (d, Fdim):
        raise ValueError(f"w_down must be [d, F] = {(d, Fdim)}, got {tuple(w_down.shape)}")
    if w_target.shape != (d, d):
        raise ValueError(f"w_target must be [d, d] = {(d, d)}, got {tuple(w_target.shape)}")
    if conv_kernel.ndim != 2 or conv_kernel.shape[1] != d:
        raise ValueError(f"conv_kernel must be [K, d={d}], got {tuple(conv_kernel.shape)}")
    if conv_mode == "causal_next" and conv_kernel.shape[0] != 2:
        raise ValueError(f"causal_next takes a kernel of width 2, got {conv_kernel.shape[0]}")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, got {tuple(segment_ids.shape)}")
    if initial_state is not None and initial_state.w_down.shape != (B, d, Fdim):
        raise ValueError(
            f"initial_state.w_down must be [B, d, F] = {(B, d, Fdim)}, "
            f"got {tuple(initial_state.w_down.shape)}"
        )

    # Compute and state in fp32 (fp64 for fp64 inputs); outputs go back in the input dtype.
    out_dtype, dtype = z.dtype, torch.promote_types(z.dtype, torch.float32)
    z, target = z.to(dtype), target.to(dtype)
    w_down, w_target, conv_kernel = w_down.to(dtype), w_target.to(dtype), conv_kernel.to(dtype)

    outputs, finals = [], []
    for b in range(B):
        bounds = [(0, T)] if segment_ids is None else segments(segment_ids[b])
        w_first = w_down if initial_state is None else initial_state.w_down[b].to(dtype)
        pieces, w_end = [], w_first
        for n_doc, (start, end) in enumerate(bounds):
            o_doc, w_end = inplace_ttt_document(
                z[b, start:end],
                target[b, start:end],
                w_start=w_first if n_doc == 0 else w_down,
                w_target=w_target,
                conv_kernel=conv_kernel,
                eta=eta,
                chunk_size=chunk_size,
                conv_mode=conv_mode,
                clip_tau=clip_tau,
            )
            pieces.append(o_doc)
        outputs.append(torch.cat(pieces, dim=0) if pieces else z.new_zeros(0, d))
        finals.append(w_end)
    o = torch.stack(outputs).to(out_dtype)
    return o, InPlaceTTTState(w_down=torch.stack(finals))


# The loop above already materialises every per-chunk weight; the alias names that form.
inplace_ttt_materialised = inplace_ttt


@dataclass(frozen=True)
class InPlaceMLPConfigRef:
    """Configuration of InPlaceMLPRef.

    Attributes:
        d_model: d, width of the MLP input and output.
        d_ff: F, width of the gated hidden layer.
        chunk_size: C, tokens per TTT chunk.
        eta: the TTT learning rate (ttt_lr).
        conv_mode: "centered" (kernel 5) or "causal_next" (kernel 2).
        target_source: "input" (V is built from the MLP input x) or "embedding" (from the token
            embeddings passed to forward).
        clip_tau: optional Frobenius clip of each chunk's Delta.
        activation: the gate activation, "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
    """

    d_model: int
    d_ff: int
    chunk_size: int = 512
    eta: float = 1.0
    conv_mode: str = "centered"
    target_source: str = "input"
    clip_tau: float | None = None
    activation: str = "silu"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.conv_mode not in CONV_MODES:
            raise ValueError(f"conv_mode must be one of {CONV_MODES}, got {self.conv_mode!r}")
        if self.target_source not in TARGET_SOURCES:
            raise ValueError(
                f"target_source must be one of {TARGET_SOURCES}, got {self.target_source!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.clip_tau is not None and self.clip_tau <= 0:
            raise ValueError(f"clip_tau must be > 0 or None, got {self.clip_tau}")

    @property
    def conv_width(self) -> int:
        return 5 if self.conv_mode == "centered" else 2


class InPlaceMLPRef(nn.Module):
    """Gated MLP (SwiGLU by default) whose down projection is an In-Place TTT fast weight.

    Parameters (math convention, a projection is x @ W):
        W_gate [d, F], W_up [d, F]: Z = act(x W_gate) * (x W_up).
        W_down [d, F]: the slow start of the fast weight, O = Z W^T.
        ttt_conv [K, d]: the depthwise conv of the target (zeros at init).
        ttt_proj [d, d]: W_target, V = conv(X0) @ ttt_proj (diagonal N(0, 0.02^2) at init).

    Args:
        config: InPlaceMLPConfigRef.
        generator: optional torch.Generator for the random initialisation.
    """

    def __init__(self, config: InPlaceMLPConfigRef, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        d, Fdim, K = config.d_model, config.d_ff, config.conv_width

        def normal(*shape: int, std: float) -> Tensor:
            return std * torch.randn(*shape, generator=generator)

        self.W_gate = nn.Parameter(normal(d, Fdim, std=0.02))
        self.W_up = nn.Parameter(normal(d, Fdim, std=0.02))
        self.W_down = nn.Parameter(normal(d, Fdim, std=0.02))
        # Official init: the conv is zero so V = 0 and the layer starts exactly at the plain MLP;
        # a nonzero W_target still lets the conv receive gradient.
        self.ttt_conv = nn.Parameter(torch.zeros(K, d))
        self.ttt_proj = nn.Parameter(torch.diag(normal(d, std=0.02)))

    def forward(
        self,
        x: Tensor,
        embeddings: Tensor | None = None,
        segment_ids: Tensor | None = None,
        initial_state: InPlaceTTTState | None = None,
    ) -> tuple[Tensor, InPlaceTTTState]:
        """Apply the layer.

        Args:
            x: [B, T, d], the MLP input.
            embeddings: [B, T, d], the token embeddings; required when target_source is
                "embedding", ignored otherwise.
            segment_ids: optional [B, T] document ids (see `inplace_ttt`).
            initial_state: optional InPlaceTTTState to continue from.

        Returns:
            o: [B, T, d], and the final InPlaceTTTState (w_down [B, d, F]).
        """
        cfg = self.config
        if cfg.target_source == "embedding":
            if embeddings is None:
                raise ValueError("target_source='embedding' needs the embeddings argument")
            target = embeddings
        else:
            target = x
        z = ACTIVATIONS[cfg.activation](x @ self.W_gate) * (x @ self.W_up)
        return inplace_ttt(
            z,
            target,
            w_down=self.W_down,
            w_target=self.ttt_proj,
            conv_kernel=self.ttt_conv,
            eta=cfg.eta,
            chunk_size=cfg.chunk_size,
            conv_mode=cfg.conv_mode,
            clip_tau=cfg.clip_tau,
            segment_ids=segment_ids,
            initial_state=initial_state,
        )
