"""Parameter counts and an analytic FLOP count of the LM (for MFU).

Training FLOPs per token = 3 x forward (the backward costs two forwards), and the forward is
`2 * N_matmul` (every parameter takes part in one multiply-add per token; the embedding table
only through the tied head, not the lookup) plus the layers' own extra terms (attention scores,
TTT inner steps: `ttt_jax.models.registry`). Remat recomputation is not counted: MFU measures
useful work, as in the PaLM paper's definition.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from ttt_jax.models.config import ModelConfig
from ttt_jax.models.lm import LM
from ttt_jax.models.registry import FAMILIES


def param_counts(config: ModelConfig) -> dict[str, int]:
    """`{"total", "embedding", "non_embedding"}` parameter counts (nothing is allocated).

    `embedding` counts the token table and, when untied, the head.
    """
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    total = sum(math.prod(x.shape) for x in leaves)
    emb = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


def flops_per_token(config: ModelConfig, seq_len: int, total_params: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    if total_params is None:
        total_params = param_counts(config)["total"]
    lookup_only = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    forward = 2.0 * (total_params - lookup_only)
    for parts in config.parts:
        for name in parts:
            forward += FAMILIES[name].flops(config.layer_config(name), seq_len)
    return 3.0 * forward
