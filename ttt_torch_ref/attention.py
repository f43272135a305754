"""Plain softmax attention, shared by the reference blocks (NPT, LaCT).

Every score is materialised ([B, H, T, T]): small sizes only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v; query t sees keys s with t - window < s <= t.

    Args:
        q, k, v: [B, T, H, D] (RoPE, if any, already applied to q and k).
        window: keys per query, the query itself included; None for all earlier keys.

    Returns:
        [B, T, H, D].
    """
    T, D = q.shape[1], q.shape[-1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    allowed = s <= t
    if window is not None:
        allowed = allowed & (t - s < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(scores, dim=-1), v)
