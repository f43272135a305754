"""Training scripts: `python -m train` (single device to multi-host, jax.sharding)."""
