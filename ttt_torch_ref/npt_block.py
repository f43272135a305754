"""A pre-norm decoder block whose MLP is an NPT MLP modulated by the attention output, SPEC 3.4.

o   = Attn(RMSNorm(x))                   causal softmax attention, RoPE on q and k
h   = x + o   if attn_residual else x    (otherwise o reaches the loss only through NPT)
out = h + NPTMLPRef(RMSNorm(h), a=o)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import causal_attention
from .common import rms_norm, rope
from .npt import NPTMLPConfigRef, NPTMLPRef


@dataclass(frozen=True)
class NPTBlockConfigRef:
    """Configuration of NPTBlockRef.

    Attributes:
        num_heads: H; head_dim: Dh (even, for RoPE).
        mlp: the NPT MLP (its d_model is the block width; its d_mod must be d_model).
        attn_residual: add the attention output to the residual stream.
        rope_theta: RoPE base; norm_eps: RMSNorm epsilon.
    """

    num_heads: int
    head_dim: int
    mlp: NPTMLPConfigRef
    attn_residual: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.mlp.d_mod != self.mlp.d_model:
            raise ValueError(f"mlp.d_mod={self.mlp.d_mod} must equal d_model={self.mlp.d_model}")


class NPTBlockRef(nn.Module):
    """Parameters: attn_norm, mlp_norm [d]; W_q, W_k, W_v [d, H, Dh]; W_o [H, Dh, d]; mlp.*."""

    def __init__(self, config: NPTBlockConfigRef, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        d, H, Dh = config.mlp.d_model, config.num_heads, config.head_dim

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(std * torch.randn(*shape, generator=generator))

        self.attn_norm = nn.Parameter(torch.ones(d))
        self.mlp_norm = nn.Parameter(torch.ones(d))
        self.W_q = normal(d, H, Dh, std=1 / math.sqrt(d))
        self.W_k = normal(d, H, Dh, std=1 / math.sqrt(d))
        self.W_v = normal(d, H, Dh, std=1 / math.sqrt(d))
        self.W_o = normal(H, Dh, d, std=1 / math.sqrt(H * Dh))
        self.mlp = NPTMLPRef(config.mlp, generator=generator)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, S, d] -> ([B, S, d], the MLP's auxiliary loss); positions 0..S-1."""
        cfg = self.config
        u = rms_norm(x, self.attn_norm, cfg.norm_eps)
        positions = torch.arange(x.shape[1])
        q = rope(torch.einsum("bsd,dhe->bshe", u, self.W_q), positions, cfg.rope_theta)
        k = rope(torch.einsum("bsd,dhe->bshe", u, self.W_k), positions, cfg.rope_theta)
        v = torch.einsum("bsd,dhe->bshe", u, self.W_v)
        o = torch.einsum("bshe,hed->bsd", causal_attention(q, k, v), self.W_o)
        h = x + o if cfg.attn_residual else x
        y, aux = self.mlp(rms_norm(h, self.mlp_norm, cfg.norm_eps), o)
        return h + y, aux
