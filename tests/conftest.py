"""JAX-only unit tests. Strict dtype promotion is not forced globally (flax and optax
promote internally); the ops' own dtype rules are asserted test by test."""
