"""Multi-host start-up: `jax.distributed.initialize` from flags or environment variables."""

from __future__ import annotations

import os

import jax


def initialize(cfg) -> bool:
    """Initialises JAX's distributed runtime when this is a multi-process run.

    Values come from `cfg` (a `DistributedConfig`), else from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID; with `cfg.auto`, JAX detects the cluster (SLURM,
    Open MPI, TPU). Returns whether the runtime was initialised. On CPU, collectives across
    processes go through gloo.
    """
    coordinator = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = cfg.num_processes or _env_int("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    if not (cfg.auto or coordinator):
        return False
    if coordinator and (num is None or pid is None):
        raise ValueError(
            f"distributed run with coordinator {coordinator!r} needs num_processes and "
            f"process_id (got {num}, {pid}): pass --dist.num-processes / --dist.process-id or "
            "set JAX_NUM_PROCESSES / JAX_PROCESS_ID"
        )
    # Only the CPU backend's cross-process collectives use this; GPUs keep NCCL.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.auto and not coordinator:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num, process_id=pid
        )
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None
