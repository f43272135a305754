"""A pre-norm decoder block whose MLP is an NPT MLP modulated by the block's attention output.

    o_t = Attn(RMSNorm(x))_t                     (causal, RoPE)
    h   = x + o            if attn_residual      (the first NPT design)
        = x                otherwise             (attention only drives the modulation)
    out = h + NPTMLP(RMSNorm(h), a=o)

With `attn_residual=False` the attention output never enters the residual stream; it reaches
the loss only through the per-token weight delta of the MLP's gate projection.

The causal attention is the shared one of `ttt_jax.layers.attention`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layers.attention import causal_attention
from ttt_jax.layers.common import MixedPrecision, attention_projections, ones, param
from ttt_jax.layers.npt_mlp import NPTMLP, NPTMLPConfig
from ttt_jax.ops.core import check_layer_input, check_positive_int, check_shapes, rms_norm


@dataclasses.dataclass(frozen=True)
class NPTBlockConfig:
    """Shape of an NPT block.

    Attributes:
      num_heads: H, attention heads.
      head_dim: Dh, attention head width (even, for RoPE).
      mlp: the NPT MLP; its `d_model` is the block width, its `precision` the block's, and its
        modulating signal is the attention output, so `mlp.d_mod` must be None or `d_model`.
      attn_residual: add the attention output to the residual stream (True) or use it only
        to modulate the MLP (False).
      rope_theta: RoPE base.
      norm_eps: RMSNorm epsilon.
    """

    num_heads: int
    head_dim: int
    mlp: NPTMLPConfig
    attn_residual: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        check_positive_int("NPTBlockConfig.num_heads", self.num_heads)
        check_positive_int("NPTBlockConfig.head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"NPTBlockConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not isinstance(self.mlp, NPTMLPConfig):
            raise ValueError(f"NPTBlockConfig.mlp must be an NPTMLPConfig, got {self.mlp!r}")
        if self.mlp.mod_width != self.mlp.d_model:
            raise ValueError(
                f"NPTBlockConfig.mlp.d_mod={self.mlp.d_mod} must be None or "
                f"d_model={self.mlp.d_model}: the modulating signal is the attention output"
            )
        if not isinstance(self.attn_residual, bool):
            raise ValueError(
                f"NPTBlockConfig.attn_residual must be a bool, got {self.attn_residual!r}"
            )
        if not self.attn_residual and self.mlp.modulation == "none":
            raise ValueError(
                "NPTBlockConfig.attn_residual=False with mlp.modulation='none' leaves the "
                "attention unused; pick a modulation or attn_residual=True"
            )
        for field in ("rope_theta", "norm_eps"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"NPTBlockConfig.{field} must be a finite number > 0, got {value!r}"
                )

    @property
    def d_model(self) -> int:
        return self.mlp.d_model

    @property
    def precision(self) -> MixedPrecision:
        return self.mlp.precision


class NPTBlock(nnx.Module):
    """Pre-norm block: RMSNorm, causal RoPE attention, RMSNorm, NPT MLP (module docstring).

    Parameters (logical axes): `attn_norm, mlp_norm: [d]` (embed), `W_q, W_k, W_v:
    [d, H, Dh]` (embed, heads, head_dim), `W_o: [H, Dh, d]` (heads, head_dim, embed), and the
    MLP's (`NPTMLP`). The block runs at `config.mlp.precision`: attention and MLP matmuls in its
    compute dtype, norms in fp32, the residual stream in the dtype of x.
    """

    def __init__(self, config: NPTBlockConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h, e = config.d_model, config.num_heads, config.head_dim
        pd = config.precision.param_dtype
        self.attn_norm = param(rngs, ones, (d,), ("embed",), pd)
        self.mlp_norm = param(rngs, ones, (d,), ("embed",), pd)
        self.W_q, self.W_k, self.W_v, self.W_o = attention_projections(rngs, d, h, h, e, pd)
        self.mlp = NPTMLP(config.mlp, rngs=rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Applies the block.

        Args:
          x: `[B, S, d]` residual stream.
          positions: `[S]` or `[B, S]` RoPE positions; default `0..S-1`.

        Returns:
          `[B, S, d]` in the dtype of x, and the MLP's auxiliary loss (fp32 scalar).
        """
        c, cd = self.config, self.config.precision.compute_dtype
        pos_shape = ("S",) if positions is None or jnp.ndim(positions) == 1 else ("B", "S")
        dims = check_shapes([("x", x, ("B", "S", c.d_model)), ("positions", positions, pos_shape)])
        check_layer_input(x, c.d_model)
        if positions is None:
            positions = jnp.arange(dims["S"])
        o = causal_attention(
            rms_norm(x, self.attn_norm[...], c.norm_eps),
            self.W_q[...],
            self.W_k[...],
            self.W_v[...],
            self.W_o[...],
            positions,
            c.rope_theta,
            cd,
        )
        h = x + o.astype(x.dtype) if c.attn_residual else x
        y, aux = self.mlp(rms_norm(h, self.mlp_norm[...], c.norm_eps), o)
        return h + y.astype(x.dtype), aux
