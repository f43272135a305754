"""ttt-jax: memory-efficient Test-Time-Training layers in JAX / Flax NNX.

`ttt_jax.ops` holds the pure functions (the math), `ttt_jax.layers` the NNX modules around
them, `ttt_jax.models` the language models and `ttt_jax.memory` the memory report and planner.
"""

from ttt_jax import ops

__version__ = "0.1.0"
__all__ = ["ops"]
