"""Flax NNX layers: own the parameters, projections and norms; call `ttt_jax.ops`.

One interface for every layer:

- `Layer(config, *, rngs)`, the config a frozen dataclass validated at construction;
- `layer(x, **inputs) -> y` over a whole sequence, `x, y: [B, T, d]`, y in the compute dtype;
  the side inputs a layer takes are keywords with the same name everywhere: `positions` and
  `segment_ids` (attention), `embeddings` and `segment_ids` (In-Place TTT), `a` (NPT's
  modulating signal). The NPT MLP also returns its auxiliary loss: `(y, aux)`;
- recurrent layers stream: `init_cache(batch_size)` and `decode(x, cache) -> (y, cache)` (TTT
  and LaCT take any number of tokens, `cache=None` starting a fresh sequence; In-Place TTT one
  token, after `prefill`); pieces of any size give the outputs of one call. Attention decodes
  from a KV cache of fixed length: `prefill(x, max_length)` or `init_cache(batch_size,
  max_length)`, then `decode(x, cache)` (`ttt_jax.models.decode` threads them all through the
  LM).
"""

# isort: skip_file
# (The banners group the index by family; isort would sort the imports across them.)

# --- the mixed-precision policy
from ttt_jax.layers.common import BF16, FP32, MixedPrecision

# --- attention, the baseline mixer
from ttt_jax.layers.attention import Attention, AttentionCache, AttentionConfig

# --- TTT-Linear / TTT-MLP mixers (SPEC 3.1)
from ttt_jax.layers.ttt_layer import TTTMLP, TTTCache, TTTConfig, TTTLayer, TTTLinear

# --- LaCT mixer: window attention + large-chunk SwiGLU fast weights (SPEC 3.2)
from ttt_jax.layers.lact import LaCTCache, LaCTConfig, LaCTLayer

# --- the plain SwiGLU MLP, the baseline MLP
from ttt_jax.layers.mlp import SwiGLU, SwiGLUConfig

# --- In-Place TTT MLP (SPEC 3.3)
from ttt_jax.layers.inplace_mlp import InPlaceCache, InPlaceMLP, InPlaceMLPConfig

# --- NPT MLP and block (SPEC 3.4)
from ttt_jax.layers.npt_mlp import NPTMLP, NPTMLPConfig
from ttt_jax.layers.npt_block import NPTBlock, NPTBlockConfig

__all__ = [
    # precision
    "BF16",
    "FP32",
    "MixedPrecision",
    # attention
    "Attention",
    "AttentionCache",
    "AttentionConfig",
    # TTT-Linear / TTT-MLP
    "TTTCache",
    "TTTConfig",
    "TTTLayer",
    "TTTLinear",
    "TTTMLP",
    # LaCT
    "LaCTCache",
    "LaCTConfig",
    "LaCTLayer",
    # SwiGLU
    "SwiGLU",
    "SwiGLUConfig",
    # In-Place TTT
    "InPlaceCache",
    "InPlaceMLP",
    "InPlaceMLPConfig",
    # NPT
    "NPTMLP",
    "NPTMLPConfig",
    "NPTBlock",
    "NPTBlockConfig",
]
