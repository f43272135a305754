"""A pre-norm residual block (any mixer, any MLP) and one period of the block pattern.

    m = Mixer(RMSNorm(x))            tagged "mixer_out"
    h = x + m                        tagged "mid_residual"
    y = MLP(RMSNorm(h), m, X0)       tagged "mlp_out"   (X0: token embeddings, In-Place TTT)
    out = h + y

The residual stream is kept in the compute dtype (bf16 under the bf16 policy: it is what
every block stores for the backward, so that halves activation memory); norms run in fp32.

Block remat (`ModelConfig.block_remat`, SPEC 4): each block is wrapped whole in `nnx.remat`
with the named policy, so the backward recomputes projections, gates and residual adds as
well as the inner scan. `save_names:mixer_out,mid_residual` keeps the tagged values; the layers'
own tags (e.g. the TTT scans') are also visible to the policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ttt_jax.layers.common import ones, param
from ttt_jax.models.config import ModelConfig
from ttt_jax.models.registry import MIXERS, MLPS
from ttt_jax.ops.core import resolve_policy, rms_norm

NAMES = ("mixer_out", "mid_residual", "mlp_out")


class Block(nnx.Module):
    """One pre-norm block: `[B, T, d] -> [B, T, d]` (module docstring).

    Parameters (logical axes): `mixer_norm, mlp_norm: [d]` (embed), and the mixer's and MLP's.
    """

    def __init__(self, config: ModelConfig, mixer: str, mlp: str, *, rngs: nnx.Rngs):
        self.config = config
        self.mixer_name = mixer
        self.mlp_name = mlp
        pd = config.mixed_precision.param_dtype
        self.mixer_norm = param(rngs, ones, (config.d_model,), ("embed",), pd)
        self.mixer = MIXERS[mixer].layer(config.layer_config(mixer), rngs=rngs)
        self.mlp_norm = param(rngs, ones, (config.d_model,), ("embed",), pd)
        self.mlp = MLPS[mlp].layer(config.layer_config(mlp), rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        embeddings: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        """Applies the block.

        Args:
          x: `[B, T, d]` residual stream (compute dtype).
          embeddings: `[B, T, d]` token embeddings X0 (In-Place TTT targets).
          positions: `[B, T]` positions within each document (RoPE).
          segment_ids: `[B, T]` document ids or None.

        Returns:
          `[B, T, d]` in the dtype of x, and the block's auxiliary loss (fp32 scalar).
        """
        c = self.config
        cd = c.mixed_precision.compute_dtype
        side = dict(positions=positions, segment_ids=segment_ids, embeddings=embeddings)
        m, mixer_aux = MIXERS[self.mixer_name].call(
            self.mixer, rms_norm(x, self.mixer_norm[...], c.norm_eps).astype(cd), **side
        )
        m = checkpoint_name(m.astype(cd), "mixer_out")
        h = checkpoint_name(x + m.astype(x.dtype), "mid_residual")
        # `a`: the modulating signal of an NPT MLP is the mixer's output.
        y, mlp_aux = MLPS[self.mlp_name].call(
            self.mlp, rms_norm(h, self.mlp_norm[...], c.norm_eps).astype(cd), a=m, **side
        )
        y = checkpoint_name(y.astype(cd), "mlp_out")
        return h + y.astype(x.dtype), mixer_aux + mlp_aux


def _apply(block: Block, x, embeddings, positions, segment_ids):
    return block(x, embeddings, positions, segment_ids)


class BlockGroup(nnx.Module):
    """One period of the pattern (`config.pattern`): the unit the model's layer scan repeats."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        period = config.blocks[: len(config.pattern)]
        self.blocks = nnx.List([Block(config, mx, mlp, rngs=rngs) for mx, mlp in period])

    def __call__(
        self,
        x: jax.Array,
        embeddings: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        """Applies the period's blocks in order (shapes as `Block.__call__`)."""
        policy = self.config.block_remat
        apply = _apply
        if policy != "none":
            # prevent_cse=False: the block runs inside the layer scan, which already keeps XLA
            # from merging the recomputation with the forward.
            apply = nnx.remat(_apply, policy=resolve_policy(policy), prevent_cse=False)
        aux = jnp.zeros((), jnp.float32)
        for block in self.blocks:
            x, a = apply(block, x, embeddings, positions, segment_ids)
            aux = aux + a
        return x, aux
