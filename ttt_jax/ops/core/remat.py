"""Named rematerialisation policies.

A policy decides which intermediates of a `jax.checkpoint`-ed function are kept for the
backward pass; everything else is recomputed. Policies are chosen by name so that configs and
command lines can carry them:

| name | keeps | memory | compute |
|---|---|---|---|
| `none` | everything (no remat) | most | least |
| `dots` | outputs of every matmul | | |
| `dots_no_batch` | matmul outputs without batch dims (projections, not the scan's matmuls) | | |
| `save_names:a,b` | only values tagged `checkpoint_name(x, "a")` or `"b"` | | |
| `offload_names:a,b` | values tagged `a`, `b`, moved to pinned host memory | | |
| `full` | nothing but the inputs | least | most |

The ops and layers tag their residuals with `checkpoint_name` (see each module's `NAMES`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

POLICY_NAMES = ("none", "full", "dots", "dots_no_batch", "save_names:<a,b>", "offload_names:<a,b>")


def _names(spec: str, prefix: str) -> list[str]:
    names = [n.strip() for n in spec[len(prefix) :].split(",") if n.strip()]
    if not names:
        raise ValueError(f"remat policy {spec!r} names no values: write e.g. '{prefix}ttt_grad'")
    return names


def resolve_policy(name: str | None) -> Callable | None:
    """Maps a policy name to a `jax.checkpoint` policy.

    Args:
      name: one of `POLICY_NAMES` (`save_names:` / `offload_names:` followed by a comma separated
        list of `checkpoint_name` tags), or None (same as "full").

    Returns:
      The policy callable; `None` means save nothing (plain `jax.checkpoint`).

    Raises:
      ValueError: for an unknown name, listing the valid ones.
    """
    cp = jax.checkpoint_policies
    if name is None or name == "full":
        return cp.nothing_saveable
    if name == "none":
        return cp.everything_saveable
    if name == "dots":
        return cp.dots_saveable
    if name == "dots_no_batch":
        return cp.dots_with_no_batch_dims_saveable
    if isinstance(name, str) and name.startswith("save_names:"):
        return cp.save_only_these_names(*_names(name, "save_names:"))
    if isinstance(name, str) and name.startswith("offload_names:"):
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=_names(name, "offload_names:"),
            offload_src="device",
            offload_dst="pinned_host",
        )
    raise ValueError(
        f"remat_policy={name!r} is not a known policy; valid: {', '.join(POLICY_NAMES)}"
    )
