"""ttt-jax: memory-efficient Test-Time-Training layers in JAX / Flax NNX.

    import ttt_jax
    layer = ttt_jax.layers.TTTLinear(ttt_jax.layers.TTTConfig(d_model=64, num_heads=4), rngs=...)

The subpackages, from the bottom up (each imports only those above it in this list):

- `ops`: pure functions on arrays, the math of each family, the chunked scan and remat policies;
- `layers`: Flax NNX modules that own parameters and call the ops;
- `models`: the decoder LM, its block registry and presets;
- `memory`: the memory report and planner (they compile layers and models);
- `data`: the training data (embedded corpus, MQAR, files), batches with segment ids;
- `convert`: Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3) in and out;
- `testing`: the error measure and tolerances of the parity tests.
"""

# isort: skip_file
# (In the order above, the order data flows; isort would sort it.)

from ttt_jax import ops
from ttt_jax import layers
from ttt_jax import models
from ttt_jax import memory
from ttt_jax import data
from ttt_jax import convert
from ttt_jax import testing

__version__ = "0.1.0"
__all__ = ["ops", "layers", "models", "memory", "data", "convert", "testing"]
