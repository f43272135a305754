"""`--seq auto`: the memory planner (`ttt_jax.memory.plan`) picks the sequence length."""

from __future__ import annotations

import jax

from ttt_jax.memory import plan


def device_budget_bytes(cfg) -> int:
    """`cfg.memory_budget_gb`, else the first device's memory limit (GPU / TPU)."""
    if cfg.memory_budget_gb is not None:
        return int(cfg.memory_budget_gb * 2**30)
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ValueError(
            "--seq auto needs a memory budget: this device reports none; pass --memory-budget-gb"
        )
    return int(stats["bytes_limit"])


def resolve_seq(cfg) -> int:
    """The sequence length: `cfg.seq`, or the planner's choice for `auto`.

    Raises:
      ValueError: for `auto` when no sequence length fits (`ttt_jax.memory.PlanError`, which
        names the closest setting) or the device reports no memory budget.
    """
    if cfg.seq != "auto":
        return cfg.seq
    per_device = max(cfg.batch_size // cfg.grad_accum // jax.device_count(), 1)
    return plan(cfg.model, device_budget_bytes(cfg), batch=per_device).seq
