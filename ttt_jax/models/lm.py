"""The decoder LM: token embedding, the block pattern scanned over its repeats, final RMSNorm,
tied or untied head.

    X0 = E[tokens]                                   [B, T, d]
    x = scan over repeats r: BlockGroup_r(x, X0)     one period of the pattern per scan step
    logits = RMSNorm(x) E^T   (tied)   or   RMSNorm(x) W_head

The repeats are one `BlockGroup` created under `nnx.vmap`, so every parameter of a group
carries a leading `layers` axis and the forward is one `lax.scan` over it: the program (and
its compile time) does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt_jax.layers.common import normal, ones, param
from ttt_jax.models.block import BlockGroup
from ttt_jax.models.config import ModelConfig
from ttt_jax.ops.core import check_shapes, matmul, rms_norm

# Mesh axes a batch is split over (`train.sharding` builds its meshes and batches from these).
BATCH_AXES = ("data", "fsdp")


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x: [B, ...]` kept split over the batch axes of the mesh in context (if any), rest free.

    Under FSDP the weights are split over `fsdp` along `embed`; left alone, XLA may follow them
    and compute on the whole batch on every device (measured on CPU, tiny preset, 2 devices:
    1,658 vs 878 MiB per device for FSDP vs data parallel; on 2 H200s, 1.5x the memory and
    0.65x the tokens/s per device). Without a mesh in context (`jax.set_mesh` /
    `use_abstract_mesh`, as the train step sets it) this is the identity.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes:
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of every token within its segment: `[B, T]` ids -> `[B, T]` int32 positions."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [
            jnp.ones_like(segment_ids[:, :1], dtype=bool),
            segment_ids[:, 1:] != segment_ids[:, :-1],
        ],
        axis=1,
    )
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


class LM(nnx.Module):
    """Decoder-only language model (module docstring).

    Parameters (logical axes): `embed: [V, d]` (vocab, embed); `groups`: the blocks of one
    pattern period, each with a leading `layers` axis of size `config.repeats`;
    `final_norm: [d]` (embed); `head: [d, V]` (embed, vocab) when untied.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, pd = config, config.mixed_precision.param_dtype
        self.embed = param(
            rngs, normal(c.embed_std), (c.vocab_size, c.d_model), ("vocab", "embed"), pd
        )

        @nnx.split_rngs(splits=c.repeats)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_groups(rngs: nnx.Rngs) -> BlockGroup:
            return BlockGroup(c, rngs=rngs)

        self.groups = make_groups(rngs)
        self.final_norm = param(rngs, ones, (c.d_model,), ("embed",), pd)
        if not c.tie_embeddings:
            self.head = param(
                rngs, normal(c.embed_std), (c.d_model, c.vocab_size), ("embed", "vocab"), pd
            )

    def __call__(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Next-token logits.

        Args:
          tokens: `[B, T]` integer token ids.
          segment_ids: `[B, T]` integer document ids of packed sequences (None: one document per
            row). Positions restart at every document; see `ttt_jax.models.registry` for which
            layers reset their state there.

        Returns:
          `logits: [B, T, V]` in fp32 and the summed auxiliary loss of the MLPs (fp32 scalar).
        """
        c = self.config
        cd = c.mixed_precision.compute_dtype
        check_shapes([("tokens", tokens, ("B", "T")), ("segment_ids", segment_ids, ("B", "T"))])
        x = constrain_batch(jnp.take(self.embed[...], tokens, axis=0).astype(cd))
        if segment_ids is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        else:
            positions = segment_positions(segment_ids)
        graphdef, stacked = nnx.split(self.groups)

        def body(carry, group_state):
            x, aux = carry
            x, a = nnx.merge(graphdef, group_state)(x, x0, positions, segment_ids)
            return (constrain_batch(x), aux + a), None

        x0 = x
        (x, aux), _ = jax.lax.scan(body, (x, jnp.zeros((), jnp.float32)), stacked)
        x = constrain_batch(rms_norm(x, self.final_norm[...], c.norm_eps).astype(cd))
        if c.tie_embeddings:
            logits = matmul("btd,vd->btv", x, self.embed[...], cd)
        else:
            logits = matmul("btd,dv->btv", x, self.head[...], cd)
        return logits, aux
