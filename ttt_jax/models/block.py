"""A pre-norm residual block (any mixer, any MLP) and one period of the block pattern.

    m = Mixer(RMSNorm(x))            tagged "mixer_out"
      (+ g * Branch(RMSNorm(x)))     a retrofit's gated branch, g per channel (below)
    h = x + m                        tagged "mid_residual"
    y = MLP(RMSNorm(h), m, X0)       tagged "mlp_out"   (X0: token embeddings, In-Place TTT)
    out = h + y

The residual stream is kept in the compute dtype (bf16 under the bf16 policy: it is what
every block stores for the backward, so that halves activation memory); norms run in fp32.

A retrofit's branch (`ModelConfig.retrofit.branch_layers`, `ttt_jax.models.retrofit`) is a
second mixer family (TTT-Linear, TTT-MLP or LaCT) on the same normalised input, added to the
mixer's output through a per-channel gate `branch_gate: [d]` that starts at 0, so the block
starts as the pretrained one. At g = 0 the branch's own parameters get no gradient, the gate
does (`dL/dg_c = sum_t branch_c(t) dL/dm_c(t)`): the first update opens the gate, the next ones
train the branch through it.

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

from ttt_jax.layers.common import ones, param, zeros
from ttt_jax.models.config import ModelConfig
from ttt_jax.models.registry import MIXERS, MLPS
from ttt_jax.ops.core import resolve_policy, rms_norm, wide_dtype

NAMES = ("mixer_out", "mid_residual", "mlp_out")


class Block(nnx.Module):
    """One pre-norm block: `[B, T, d] -> [B, T, d]` (module docstring).

    Parameters (logical axes): `mixer_norm, mlp_norm: [d]` (embed), and the mixer's and MLP's;
    with a `branch` (a mixer family's name) also the branch's and `branch_gate: [d]` (embed).
    """

    def __init__(
        self,
        config: ModelConfig,
        mixer: str,
        mlp: str,
        branch: str | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.mixer_name = mixer
        self.mlp_name = mlp
        self.branch_name = branch
        pd = config.mixed_precision.param_dtype
        self.mixer_norm = param(rngs, ones, (config.d_model,), ("embed",), pd)
        self.mixer = MIXERS[mixer].layer(config.layer_config(mixer), rngs=rngs)
        self.mlp_norm = param(rngs, ones, (config.d_model,), ("embed",), pd)
        self.mlp = MLPS[mlp].layer(config.layer_config(mlp), rngs=rngs)
        if branch is not None:
            # Created after the block's own parameters, so that the pretrained block's random
            # draws (of a fresh model) do not depend on the branch.
            self.branch = MIXERS[branch].layer(config.layer_config(branch), rngs=rngs)
            self.branch_gate = param(rngs, zeros, (config.d_model,), ("embed",), pd)

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
        xn = rms_norm(x, self.mixer_norm[...], c.norm_eps).astype(cd)
        m, mixer_aux = MIXERS[self.mixer_name].call(self.mixer, xn, **side)
        if self.branch_name is not None:
            b, branch_aux = MIXERS[self.branch_name].call(self.branch, xn, **side)
            w = wide_dtype(cd)
            gate = self.branch_gate[...].astype(w)
            m = m.astype(w) + gate * b.astype(w)
            mixer_aux = mixer_aux + branch_aux
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
    """One period of the layers (`config.period`, the pattern's unless a retrofit lengthens
    it): the unit the model's layer scan repeats."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        period = config.parts[: config.period]
        self.blocks = nnx.List([Block(config, *parts, rngs=rngs) for parts in period])

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
