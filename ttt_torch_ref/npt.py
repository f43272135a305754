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
`npt_generated_rank_k_linear` builds u and w from a code g, then calls `npt_rank_k_linear`.
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


def npt_generated_rank_k_linear(
    h: Tensor, g: Tensor, *, W: Tensor, W_u: Tensor, W_w: Tensor
) -> Tensor:
    """The rank-k map with vectors generated linearly from a code g, forming u and w.

        u_{t,k} = sum_i g_{t,i} W_u[i, k],   w_{t,k} = sum_i g_{t,i} W_w[i, k]

    Args:
        h: [B, S, d]; g: [B, S, r]; W: [d, F]; W_u: [r, k, d]; W_w: [r, k, F].

    Returns:
        [B, S, F], `npt_rank_k_linear(h, u, w, W=W)`.
    """
    u = torch.einsum("bsr,rkd->bskd", g, W_u)
    w = torch.einsum("bsr,rkf->bskf", g, W_w)
    return npt_rank_k_linear(h, u, w, W=W)


MODULATIONS = ("low_rank", "rank_k", "none")


@dataclass(frozen=True)
class NPTMLPConfigRef:
    """Configuration of NPTMLPRef.

    Attributes:
        d_model: d, width of the MLP input and output.
        d_ff: F, width of the gated hidden layer.
        rank: r, rank of the per-token delta (low_rank) or width of the code g_t (rank_k).
        d_mod: d_a, width of the modulating signal; None means d_model.
        scale: s in m_t = s * tanh(a_t @ A_m) (low_rank).
        modulation: "low_rank" (A diag(m_t) B), "rank_k" (sum_k u_{t,k}^T w_{t,k} with
            generated vectors) or "none" (the plain SwiGLU MLP).
        k: number of per-token vector pairs (rank_k).
        reg_lambda: weight of the auxiliary loss
            reg_lambda * mean_t [sum_k ||u_{t,k}||^2 + sum_k ||w_{t,k}||^2].
    """

    d_model: int
    d_ff: int
    rank: int = 16
    d_mod: int | None = None
    scale: float = 0.1
    modulation: str = "low_rank"
    k: int = 1
    reg_lambda: float = 0.0

    def __post_init__(self) -> None:
        if self.d_mod is None:
            object.__setattr__(self, "d_mod", self.d_model)
        for name in ("d_model", "d_ff", "rank", "d_mod", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {MODULATIONS}, got {self.modulation!r}")
        if self.reg_lambda < 0:
            raise ValueError(f"reg_lambda must be >= 0, got {self.reg_lambda}")


class NPTMLPRef(nn.Module):
    """SwiGLU MLP whose gate projection is modulated per token (NPT).

        gate_t = x_t (W_gate + Delta W_t)
        y_t    = (silu(gate_t) * (x_t W_up)) W_down

    low_rank: m_t = s * tanh(a_t @ A_m), Delta W_t = A diag(m_t) B (npt_modulated_linear).
    rank_k:   g_t = a_t @ W_gen, u_{t,k} = g_t W_u[:, k], w_{t,k} = g_t W_w[:, k],
              Delta W_t = sum_k u_{t,k}^T w_{t,k} (npt_generated_rank_k_linear).
    none:     Delta W_t = 0.

    The auxiliary loss writes every modulation as vector pairs and penalises their squared norms,
    averaged over the B * S tokens: low_rank is the rank-k form with k = r,
    u_{t,i} = m_{t,i} A[:, i] and w_{t,i} = B[i, :].

    Parameters (math convention, a projection is x @ W):
        W_gate [d, F], W_up [d, F], W_down [F, d];
        low_rank: A [d, r], B [r, F], A_m [d_a, r];
        rank_k: W_gen [d_a, r], W_u [r, k, d], W_w [r, k, F].

    Args:
        config: NPTMLPConfigRef.
        generator: optional torch.Generator for the random initialisation.
    """

    def __init__(self, config: NPTMLPConfigRef, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        d, Fdim, r, d_a, k = config.d_model, config.d_ff, config.rank, config.d_mod, config.k

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(std * torch.randn(*shape, generator=generator))

        self.W_gate = normal(d, Fdim, std=0.02)
        self.W_up = normal(d, Fdim, std=0.02)
        self.W_down = normal(Fdim, d, std=0.02)
        # Small factors so the delta starts near zero and the MLP near its static function.
        if config.modulation == "low_rank":
            self.A = normal(d, r, std=0.01 / math.sqrt(d))
            self.B = normal(r, Fdim, std=0.01 / math.sqrt(r))
            self.A_m = normal(d_a, r, std=0.01 / math.sqrt(d))
        elif config.modulation == "rank_k":
            self.W_gen = normal(d_a, r, std=1 / math.sqrt(d_a))
            self.W_u = normal(r, k, d, std=0.01 / math.sqrt(r * d))
            self.W_w = normal(r, k, Fdim, std=0.01 / math.sqrt(r * k))

    def modulation(self, a: Tensor) -> Tensor:
        """m = s * tanh(a @ A_m): [B, S, d_a] -> [B, S, r] (low_rank)."""
        return self.config.scale * torch.tanh(a @ self.A_m)

    def vectors(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """The per-token pairs (u [B, S, k, d], w [B, S, k, F]) whose outer products sum to
        Delta W_t; for low_rank, k = r with u_{t,i} = m_{t,i} A[:, i], w_{t,i} = B[i]."""
        if self.config.modulation == "low_rank":
            m = self.modulation(a)
            u = m[..., :, None] * self.A.T
            return u, self.B.expand(*m.shape[:2], *self.B.shape)
        g = a @ self.W_gen
        return (
            torch.einsum("bsr,rkd->bskd", g, self.W_u),
            torch.einsum("bsr,rkf->bskf", g, self.W_w),
        )

    def aux_loss(self, a: Tensor) -> Tensor:
        """reg_lambda * mean over tokens of the squared norms of all vector pairs, a scalar."""
        cfg = self.config
        if cfg.modulation == "none" or cfg.reg_lambda == 0:
            return a.new_zeros(())
        u, w = self.vectors(a)
        per_token = (u**2).sum(dim=(-2, -1)) + (w**2).sum(dim=(-2, -1))
        return cfg.reg_lambda * per_token.mean()

    def forward(self, x: Tensor, a: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Apply the layer.

        Args:
            x: [B, S, d], the MLP input.
            a: [B, S, d_a], the modulating signal (ignored when modulation is "none").

        Returns:
            y: [B, S, d], and the auxiliary loss (a scalar, 0 when reg_lambda is 0).
        """
        cfg = self.config
        if cfg.modulation == "low_rank":
            gate = npt_modulated_linear(x, self.modulation(a), W=self.W_gate, A=self.A, B=self.B)
        elif cfg.modulation == "rank_k":
            gate = npt_generated_rank_k_linear(
                x, a @ self.W_gen, W=self.W_gate, W_u=self.W_u, W_w=self.W_w
            )
        else:
            gate = x @ self.W_gate
        y = (F.silu(gate) * (x @ self.W_up)) @ self.W_down
        aux = self.aux_loss(a) if cfg.modulation != "none" else x.new_zeros(())
        return y, aux
