"""The TTT layer (TTT-Linear / TTT-MLP) around the ops of `ttt.py`, written for reading.

Every weight is stored in math convention: a projection is `x @ W`, with W [in, out].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .common import gelu_tanh, layer_norm, rope
from .ttt import TTTLinearState, TTTMLPState, ttt_linear, ttt_mlp

_INNERS = ("linear", "mlp")
_BACKBONES = ("mamba", "transformer")


@dataclass(frozen=True)
class TTTLayerConfigRef:
    """Configuration of TTTLayerRef.

    Attributes:
        d_model: width of the layer input and output.
        num_heads: H, number of TTT heads.
        head_dim: D, per-head width; None means d_model // num_heads.
        inner: "linear" (f(x) = x W1 + b1) or "mlp" (hidden 4D, gelu_tanh).
        mini_batch_size: C, tokens per inner mini-batch.
        base_lr: scale of the learned per-token learning rate eta.
        backbone: "mamba" (shared q/k projection, causal convs, output gate) or "transformer"
            (separate q and k projections, no conv, no gate).
        rope_theta: RoPE base.
        conv_width: width of the causal depthwise convs (mamba backbone).
    """

    d_model: int
    num_heads: int
    head_dim: int | None = None
    inner: str = "linear"
    mini_batch_size: int = 16
    base_lr: float = 1.0
    backbone: str = "mamba"
    rope_theta: float = 10000.0
    conv_width: int = 4

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.inner not in _INNERS:
            raise ValueError(f"inner must be one of {_INNERS}, got {self.inner!r}")
        if self.backbone not in _BACKBONES:
            raise ValueError(f"backbone must be one of {_BACKBONES}, got {self.backbone!r}")
        if self.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {self.mini_batch_size}")
        if self.conv_width < 1:
            raise ValueError(f"conv_width must be >= 1, got {self.conv_width}")


def causal_conv(u: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Causal depthwise conv over time.

    out[t] = bias + sum_{j=0}^{w-1} weight[j] * u[t - (w-1) + j], with u = 0 at negative times.

    Args:
        u: [B, T, N].
        weight: [w, N], one filter per channel; weight[w-1] multiplies the current token.
        bias: [N].

    Returns:
        [B, T, N].
    """
    width, T = weight.shape[0], u.shape[1]
    padded = torch.cat([u.new_zeros(u.shape[0], width - 1, u.shape[2]), u], dim=1)
    return bias + sum(weight[j] * padded[:, j : j + T] for j in range(width))


class TTTLayerRef(nn.Module):
    """TTT-Linear / TTT-MLP layer: projections, convs, RoPE, learned rates, the op, norm, gate.

    Args:
        config: the layer configuration.
        generator: optional torch.Generator for the random initialisation.
    """

    def __init__(self, config: TTTLayerConfigRef, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        d, H, D, C = config.d_model, config.num_heads, config.head_dim, config.mini_batch_size
        HD = H * D

        def normal(*shape: int) -> nn.Parameter:
            return nn.Parameter(0.02 * torch.randn(*shape, generator=generator))

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape))

        def ones(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.ones(*shape))

        if config.backbone == "mamba":
            self.W_qk = normal(d, HD)
            self.conv_q_w = normal(config.conv_width, HD)
            self.conv_q_b = zeros(HD)
            self.conv_k_w = normal(config.conv_width, HD)
            self.conv_k_b = zeros(HD)
            self.W_g = normal(d, HD)
        else:
            self.W_q = normal(d, HD)
            self.W_k = normal(d, HD)
        self.W_v = normal(d, HD)
        self.W_o = normal(HD, d)
        self.lr_w = normal(H, d)
        self.lr_b = zeros(H)
        self.token_offset = zeros(C)
        self.ttt_norm_scale = ones(H, D)
        self.ttt_norm_bias = zeros(H, D)
        self.post_norm_scale = ones(HD)
        self.post_norm_bias = zeros(HD)
        if config.inner == "linear":
            self.W1 = normal(H, D, D)
            self.b1 = zeros(H, D)
        else:
            self.W1 = normal(H, D, 4 * D)
            self.b1 = zeros(H, 4 * D)
            self.W2 = normal(H, 4 * D, D)
            self.b2 = zeros(H, D)

    def token_scale(self) -> Tensor:
        """token_scale[i] = max(1/(i+1) + token_offset[i], 0), [C]."""
        C = self.config.mini_batch_size
        base = 1.0 / torch.arange(1, C + 1, dtype=self.token_offset.dtype)
        return torch.clamp(base + self.token_offset, min=0.0)

    def learning_rate(self, x: Tensor) -> Tensor:
        """eta[b, t, h] = base_lr * sigmoid(x[b, t] . lr_w[h] + lr_b[h]) / D, [B, T, H]."""
        logits = torch.einsum("btd,hd->bth", x, self.lr_w) + self.lr_b
        return self.config.base_lr * torch.sigmoid(logits) / self.config.head_dim

    def queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q, k before RoPE, each [B, T, H*D]."""
        if self.config.backbone == "mamba":
            xqk = x @ self.W_qk
            return (
                causal_conv(xqk, self.conv_q_w, self.conv_q_b),
                causal_conv(xqk, self.conv_k_w, self.conv_k_b),
            )
        return x @ self.W_q, x @ self.W_k

    def forward(
        self,
        x: Tensor,
        initial_state: TTTLinearState | TTTMLPState | None = None,
        position_offset: int = 0,
    ) -> tuple[Tensor, TTTLinearState | TTTMLPState]:
        """Runs the layer.

        Args:
            x: [B, T, d_model].
            initial_state: per-sample fast weights ([B, H, ...]) to start from; None means the
                layer's W1, b1 (, W2, b2) broadcast over B.
            position_offset: absolute position of x[:, 0], for RoPE when streaming.

        Returns:
            y: [B, T, d_model].
            final_state: the fast weights after the last complete mini-batch.
        """
        cfg = self.config
        B, T, _ = x.shape
        H, D, C = cfg.num_heads, cfg.head_dim, cfg.mini_batch_size

        q, k = self.queries_keys(x)
        v = x @ self.W_v
        q, k, v = (t.reshape(B, T, H, D) for t in (q, k, v))
        # Positions restart every mini-batch: the inner model only ever compares tokens of one
        # mini-batch, so only the position inside it matters.
        positions = (position_offset + torch.arange(T)) % C
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)

        common = dict(
            ln_scale=self.ttt_norm_scale,
            ln_bias=self.ttt_norm_bias,
            mini_batch_size=C,
            token_scale=self.token_scale(),
            initial_state=initial_state,
        )
        if cfg.inner == "linear":
            o, state = ttt_linear(q, k, v, self.learning_rate(x), W1=self.W1, b1=self.b1, **common)
        else:
            o, state = ttt_mlp(
                q,
                k,
                v,
                self.learning_rate(x),
                W1=self.W1,
                b1=self.b1,
                W2=self.W2,
                b2=self.b2,
                **common,
            )

        o = layer_norm(o.reshape(B, T, H * D), self.post_norm_scale, self.post_norm_bias)
        if cfg.backbone == "mamba":
            o = gelu_tanh(x @ self.W_g) * o
        return o @ self.W_o, state
