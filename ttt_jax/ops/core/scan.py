"""The scan over chunks with checkpoint groups, shared by every recurrent family.

Why groups: autodiff through `lax.scan` keeps every step's residuals, including the carried
fast weights, so memory grows as `n_chunks x (state + activations)`. With
`checkpoint_group=G` the chunks are scanned in groups of G; each group is one
`jax.checkpoint`-ed inner scan, so the backward keeps only the carry at each group boundary
(`n_chunks / G` states) and recomputes one group's steps (G steps of residuals) at a time. With
G near sqrt(n_chunks) that is the classic sqrt(N) trade: one extra forward for O(sqrt(N)) memory.

A number of chunks that G does not divide is handled by one shorter last group, never by
padding: padded chunks would update the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.core.checks import check_optional_positive_int, check_positive_int
from ttt_jax.ops.core.remat import resolve_policy

Step = Callable[[Any, Any], tuple[Any, Any]]


def check_scan_knobs(checkpoint_group: int | None, remat_policy: str | None) -> None:
    """Validates the memory knobs before tracing (ValueError naming the argument)."""
    check_optional_positive_int("checkpoint_group", checkpoint_group)
    resolve_policy(remat_policy)
    if checkpoint_group is None and remat_policy not in (None, "none"):
        raise ValueError(
            f"remat_policy={remat_policy!r} needs checkpoint_group: set checkpoint_group=1 to "
            "rematerialise every chunk, or G to rematerialise groups of G chunks"
        )
    if (
        isinstance(remat_policy, str)
        and remat_policy.startswith("offload_names:")
        and checkpoint_group not in (None, 1)
    ):
        # XLA's host offloader (jax 0.11.2, H200) cannot place the offloaded residuals of a
        # scan nested in a scan: compiling fails at post-layout-assignment with "Expected
        # instruction to have shape equal to ..." after converting the outer scan's dynamic
        # slice of the host buffer into host compute. One checkpointed step per chunk (a
        # single scan) offloads and keeps its gradients (probe in benchmarks/RESULTS.md).
        raise ValueError(
            f"remat_policy={remat_policy!r} needs checkpoint_group=1, got "
            f"checkpoint_group={checkpoint_group}: XLA cannot offload the residuals of the "
            "nested scan that checkpoint groups of more than one chunk use"
        )


def chunked_scan(
    step: Step,
    carry: Any,
    xs: Any,
    *,
    checkpoint_group: int | None = None,
    remat_policy: str | None = None,
    unroll: int = 1,
) -> tuple[Any, Any]:
    """`lax.scan(step, carry, xs)` with the backward memory set by checkpoint groups.

    Args:
      step: `(carry, x) -> (carry, y)` for one chunk; `x` is one slice of `xs` along axis 0.
      carry: the initial carry (a pytree).
      xs: a pytree of arrays with the chunk axis first, `[n_chunks, ...]`.
      checkpoint_group: None for plain autodiff (every step's residuals kept), or G >= 1 to
        rematerialise groups of G chunks (only every G-th carry kept).
      remat_policy: what a rematerialised group may keep besides its input carry (a name from
        `ttt_jax.ops.core.remat.POLICY_NAMES`); None means "full" (keep nothing). Needs
        `checkpoint_group`.
      unroll: `lax.scan` unroll factor of the innermost scan (speed only).

    Returns:
      `(final carry, ys)` exactly as `lax.scan` would return them.
    """
    check_scan_knobs(checkpoint_group, remat_policy)
    check_positive_int("unroll", unroll)
    leaves = jax.tree.leaves(xs)
    n = leaves[0].shape[0] if leaves else 0
    if checkpoint_group is None or n == 0:
        return lax.scan(step, carry, xs, length=n, unroll=unroll)

    group_size = min(checkpoint_group, n)
    if group_size == 1:
        # Groups of one chunk: one checkpointed step per chunk in a single scan (no inner scan,
        # which is also the only structure XLA can host-offload residuals of).
        step_ckpt = jax.checkpoint(step, policy=resolve_policy(remat_policy), prevent_cse=False)
        return lax.scan(step_ckpt, carry, xs, length=n, unroll=unroll)

    def group(c, xg):
        return lax.scan(step, c, xg, unroll=min(unroll, group_size))

    # prevent_cse=False: inside a scan, CSE cannot merge the recomputation with the forward,
    # and the optimisation barrier it would insert only slows the loop down.
    group = jax.checkpoint(group, policy=resolve_policy(remat_policy), prevent_cse=False)

    n_groups, rest = divmod(n, group_size)
    ys_parts = []
    if n_groups:
        head = jax.tree.map(
            lambda x: x[: n_groups * group_size].reshape(n_groups, group_size, *x.shape[1:]), xs
        )
        carry, ys = lax.scan(group, carry, head)
        ys_parts.append(jax.tree.map(lambda y: y.reshape(n_groups * group_size, *y.shape[2:]), ys))
    if rest:
        carry, ys = group(carry, jax.tree.map(lambda x: x[n_groups * group_size :], xs))
        ys_parts.append(ys)
    if len(ys_parts) == 1:
        return carry, ys_parts[0]
    return carry, jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=0), *ys_parts)
