"""NPT: a linear map whose weight changes per token by a low-rank delta, SPEC 3.4.

From a modulating signal a (e.g. the attention output), per token t:

    m_t       = s * tanh(a_t @ A_m)                ([r])
    Delta W_t = A diag(m_t) B                      ([d, F]; A [d, r], B [r, F])
    y_t       = h_t (W + Delta W_t) = h_t W + ((h_t A) * m_t) B

and the rank-k variant with per-token vectors u_{t,k} [d], w_{t,k} [F]:

    Delta W_t = sum_k u_{t,k}^T w_{t,k},    y_t = h_t W + sum_k (h_t . u_{t,k}) w_{t,k}.

Each op is written twice: `*_materialised` builds Delta W_t ([B, S, d, F], tiny sizes only) and
multiplies by it, exactly as the equations read; the plain name is the factored form that never
forms it. The self checks compare the two. NPT ops have no state and return the output alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def npt_modulated_linear_materialised(
    h: Tensor, m: Tensor, *, W: Tensor, A: Tensor, B: Tensor
) -> Tensor:
    """y_t = h_t (W + A diag(m_t) B), forming every per-token weight.

    Args:
        h: [B, S, d], the input of the linear map.
        m: [B, S, r], the per-token modulation.
        W: [d, F], the static weight.
        A: [d, r], B: [r, F], the low-rank factors.

    Returns:
        [B, S, F].
    """
    delta_W = torch.einsum("dr,bsr,rf->bsdf", A, m, B)
    return torch.einsum("bsd,bsdf->bsf", h, W + delta_W)


def npt_modulated_linear(h: Tensor, m: Tensor, *, W: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """y_t = h_t W + ((h_t A) * m_t) B: the same map without forming Delta W_t.

    Args:
        h: [B, S, d]; m: [B, S, r]; W: [d, F]; A: [d, r]; B: [r, F].

    Returns:
        [B, S, F].
    """
    return h @ W + ((h @ A) * m) @ B


def npt_rank_k_linear_materialised(h: Tensor, u: Tensor, w: Tensor, *, W: Tensor) -> Tensor:
    """y_t = h_t (W + sum_k u_{t,k}^T w_{t,k}), forming every per-token weight.

    Args:
        h: [B, S, d]; u: [B, S, k, d]; w: [B, S, k, F]; W: [d, F].

    Returns:
        [B, S, F].
    """
    delta_W = torch.einsum("bskd,bskf->bsdf", u, w)
    return torch.einsum("bsd,bsdf->bsf", h, W + delta_W)


def npt_rank_k_linear(h: Tensor, u: Tensor, w: Tensor, *, W: Tensor) -> Tensor:
    """y_t = h_t W + sum_k (h_t . u_{t,k}) w_{t,k}: the same map without forming Delta W_t.

    Args:
        h: [B, S, d]; u: [B, S, k, d]; w: [B, S, k, F]; W: [d, F].

    Returns:
        [B, S, F].
    """
    coeff = torch.einsum("bsd,bskd->bsk", h, u)
    return h @ W + torch.einsum("bsk,bskf->bsf", coeff, w)


@dataclass(frozen=True)
class NPTMLPConfigRef:
    """Configuration of NPTMLPRef.

    Attributes:
        d_model: d, width of the MLP input and output.
        d_ff: F, width of the gated hidden layer.
        rank: r, rank of the per-token delta.
        d_mod: d_a, width of the modulating signal; None means d_model.
        scale: s in m_t = s * tanh(a_t @ A_m).
    """

    d_model: int
    d_ff: int
    rank: int = 16
    d_mod: int | None = None
    scale: float = 0.1

    def __post_init__(self) -> None:
        if self.d_mod is None:
            object.__setattr__(self, "d_mod", self.d_model)
        for name in ("d_model", "d_ff", "rank", "d_mod"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class NPTMLPRef(nn.Module):
    """SwiGLU MLP whose gate projection is modulated per token (NPT).

        m    = s * tanh(a @ A_m)
        gate = x W_gate + ((x A) * m) B        (npt_modulated_linear)
        y    = (silu(gate) * (x W_up)) W_down

    Parameters (math convention, a projection is x @ W):
        W_gate [d, F], W_up [d, F], W_down [F, d], A [d, r], B [r, F], A_m [d_a, r].

    Args:
        config: NPTMLPConfigRef.
        generator: optional torch.Generator for the random initialisation.
    """

    def __init__(self, config: NPTMLPConfigRef, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        d, Fdim, r, d_a = config.d_model, config.d_ff, config.rank, config.d_mod

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(std * torch.randn(*shape, generator=generator))

        self.W_gate = normal(d, Fdim, std=0.02)
        self.W_up = normal(d, Fdim, std=0.02)
        self.W_down = normal(Fdim, d, std=0.02)
        # Small factors so the delta starts near zero and the MLP near its static function.
        self.A = normal(d, r, std=0.01 / math.sqrt(d))
        self.B = normal(r, Fdim, std=0.01 / math.sqrt(r))
        self.A_m = normal(d_a, r, std=0.01 / math.sqrt(d))

    def modulation(self, a: Tensor) -> Tensor:
        """m = s * tanh(a @ A_m): [B, S, d_a] -> [B, S, r]."""
        return self.config.scale * torch.tanh(a @ self.A_m)

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            x: [B, S, d], the MLP input.
            a: [B, S, d_a], the modulating signal.

        Returns:
            [B, S, d].
        """
        gate = npt_modulated_linear(x, self.modulation(a), W=self.W_gate, A=self.A, B=self.B)
        return (F.silu(gate) * (x @ self.W_up)) @ self.W_down
