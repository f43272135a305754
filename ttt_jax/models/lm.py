"""The decoder LM: token embedding, the block pattern scanned over its repeats, final RMSNorm,
tied or untied head.

    X0 = E[tokens]                                   [B, T, d]
    x = scan over repeats r: BlockGroup_r(x, X0)     one period of the pattern per scan step
    logits = RMSNorm(x) E^T   (tied)   or   RMSNorm(x) W_head

The repeats are one `BlockGroup` created under `nnx.vmap`, so every parameter of a group
carries a leading `layers` axis and the forward is one `lax.scan` over it: the program (and
its compile time) does not grow with depth.

Decoding: `prefill(prompt, max_length)` returns the logits and an `LMCache` (every layer's
cache, `ttt_jax.models.decode`, stacked like the parameters and threaded through the same
scan); `decode(tokens, cache)` continues it. `ttt_jax.models.generate` samples with them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from ttt_jax.layers.common import normal, ones, param
from ttt_jax.models.block import BlockGroup
from ttt_jax.models.config import ModelConfig
from ttt_jax.models.decode import group_step
from ttt_jax.ops.core import check_positive_int, check_shapes, matmul, rms_norm

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
        return self._logits(x), aux

    def prefill(
        self, tokens: jax.Array, max_length: int, *, last_only: bool = False
    ) -> tuple[jax.Array, LMCache]:
        """Reads a prompt and returns the caches to continue it (`decode`).

        Args:
          tokens: `[B, T]` integer prompt ids (one document per row, all rows T long).
          max_length: tokens the sequence may reach, prompt included (the attention caches'
            rows); at least T.
          last_only: return the logits of the last position only (`[B, 1, V]`).

        Returns:
          `logits: [B, T, V]` fp32 (what `model(tokens)[0]` gives) and the `LMCache`.
        """
        check_shapes([("tokens", tokens, ("B", "T"))])
        t = tokens.shape[1]
        if check_positive_int("max_length", max_length) < t:
            raise ValueError(f"max_length={max_length} is shorter than the prompt ({t} tokens)")
        return self._run(tokens, None, max_length, last_only)

    def decode(
        self, tokens: jax.Array, cache: LMCache, *, last_only: bool = False
    ) -> tuple[jax.Array, LMCache]:
        """Continues the sequences of `cache` with `tokens: [B, L]` (any L >= 1).

        Returns:
          `logits: [B, L, V]` fp32 (those of the whole sequence so far at its last L
          positions) and the cache after these tokens. The caller keeps the sequence within
          the cache's `max_length` (`ttt_jax.models.generate` does).
        """
        check_shapes([("tokens", tokens, ("B", "L"))])
        if not isinstance(cache, LMCache):
            raise ValueError(f"cache must be an LMCache (from LM.prefill), got {type(cache)}")
        return self._run(tokens, cache, cache.max_length, last_only)

    def _run(self, tokens, cache, max_length, last_only):
        c = self.config
        cd = c.mixed_precision.compute_dtype
        x0 = constrain_batch(jnp.take(self.embed[...], tokens, axis=0).astype(cd))
        graphdef, stacked = nnx.split(self.groups)

        def body(x, xs):
            group_state, group_cache = xs
            group = nnx.merge(graphdef, group_state)
            x, new = group_step(group, x, x0, group_cache, max_length=max_length)
            return constrain_batch(x), new

        layers = None if cache is None else cache.layers
        x, layers = jax.lax.scan(body, x0, (stacked, layers))
        if last_only:
            x = x[:, -1:]
        length = jnp.asarray(tokens.shape[1], jnp.int32)
        if cache is not None:
            length = cache.length + length
        return self._logits(x), LMCache(layers=layers, length=length, max_length=max_length)

    def _logits(self, x: jax.Array) -> jax.Array:
        """Final RMSNorm and the (tied or untied) head: `[B, T, d]` -> fp32 `[B, T, V]`."""
        c = self.config
        cd = c.mixed_precision.compute_dtype
        x = constrain_batch(rms_norm(x, self.final_norm[...], c.norm_eps).astype(cd))
        if c.tie_embeddings:
            return matmul("btd,vd->btv", x, self.embed[...], cd)
        return matmul("btd,dv->btv", x, self.head[...], cd)


@struct.dataclass
class LMCache:
    """What `LM.decode` continues from.

    Attributes:
      layers: per block of the scanned period, its cache (`ttt_jax.models.decode`) with every
        array stacked on a leading `layers` axis of the period's repeats.
      length: `[]` int32, tokens read so far.
      max_length: the most tokens the sequence may reach (static).
    """

    layers: list
    length: jax.Array
    max_length: int = struct.field(pytree_node=False)
