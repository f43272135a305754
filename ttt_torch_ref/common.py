"""Pieces every reference module shares: the tanh GELU, LayerNorm, RMSNorm, RoPE and the shape
check of the ops' arguments. Written out from their formulas (no `torch.nn.functional` versions)
so that what the reference computes is on the page.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LN_EPS = 1e-6


def gelu_tanh(x: Tensor) -> Tensor:
    """The tanh approximation of GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x: Tensor, scale: Tensor, bias: Tensor, eps: float = LN_EPS) -> Tensor:
    """LayerNorm over the last dim with the biased variance.

    Args:
        x: [..., D].
        scale: broadcastable to x, e.g. [D] or [H, 1, D] for per-head norms of [B, H, n, D].
        bias: same shape as scale.
        eps: added to the variance.

    Returns:
        (x - mean) / sqrt(var + eps) * scale + bias, shape of x.
    """
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * scale + bias


def rms_norm(x: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis."""
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * scale


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding on interleaved pairs (x[..., 2i], x[..., 2i+1]).

    Args:
        x: [B, T, H, D].
        positions: [T], the position of each token (taken modulo C by the TTT layer).
        theta: RoPE base; pair i turns by angle p * theta^(-2i/D).

    Returns:
        [B, T, H, D].
    """
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=x.dtype) / D)  # [D/2]
    angle = positions.to(x.dtype)[:, None] * inv_freq  # [T, D/2]
    cos, sin = torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :]  # against [B, T, H, D/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def check_shape(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    """A ValueError naming the argument unless `x` has exactly `shape`."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
