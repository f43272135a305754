"""What the memory tools compile: a layer or model config with its remat settings, turned into
training programs on abstract shapes.

A `Workload` is a config plus a `Remat` (the knobs the planner turns). `programs(batch, seq)`
gives the jitted functions the report and the planner compile, each with abstract arguments
(`jax.ShapeDtypeStruct`, nothing allocated) and a way to make real ones for a GPU measurement:

- `forward`: the layer's (or model's loss) forward.
- `fwd_bwd`: loss and gradients w.r.t. the parameters (and a layer's input); its peak is the
  backward peak.
- `train_step` (models): `fwd_bwd` plus the optimizer update, parameters and optimizer state
  donated as in a real training step; the number the planner fits into a budget.

`ttt_jax.memory.layer_workload` and `ttt_jax.memory.model_workload` hold the two kinds.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.memory.analysis import CompiledMemory, compiled_memory
from ttt_jax.ops.core import check_optional_positive_int, resolve_policy


@dataclasses.dataclass(frozen=True)
class Remat:
    """Remat settings (SPEC 4).

    Attributes:
      checkpoint_group: chunks per rematerialised inner-scan step (None: no scan remat).
      remat_policy: what a rematerialised scan group keeps (`ttt_jax.ops.core.remat` name).
      block_remat: models only: the policy the whole block is rematerialised with, or None
        for no block remat.
    """

    checkpoint_group: int | None = None
    remat_policy: str | None = None
    block_remat: str | None = None

    def __post_init__(self):
        check_optional_positive_int("Remat.checkpoint_group", self.checkpoint_group)
        resolve_policy(self.remat_policy)
        if self.block_remat is not None:
            resolve_policy(self.block_remat)

    def label(self, block: bool = True) -> str:
        """`checkpoint_group=.. [remat_policy=..] [block_remat=..]` (`block`: with the last)."""
        parts = [f"checkpoint_group={self.checkpoint_group}"]
        if self.checkpoint_group is not None:
            parts.append(f"remat_policy={self.remat_policy or 'full'}")
        if block:
            parts.append(f"block_remat={self.block_remat or 'off'}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Program:
    """One function to compile: `fn(*args)`, `args` abstract; `real_args()` makes real ones
    (same shapes, random values) for a measurement."""

    fn: Callable
    args: tuple
    real_args: Callable[[], tuple]
    donate_argnums: tuple[int, ...] = ()

    def compiled(self) -> CompiledMemory:
        return compiled_memory(self.fn, *self.args, donate_argnums=self.donate_argnums)


class Workload(abc.ABC):
    """A config whose training memory the report shows and the planner searches."""

    @property
    @abc.abstractmethod
    def remat(self) -> Remat:
        """The remat settings now in force."""

    @abc.abstractmethod
    def with_remat(self, remat: Remat) -> Workload:
        """The same workload under other remat settings."""

    @abc.abstractmethod
    def remat_candidates(self) -> list[Remat]:
        """Settings worth trying, least recomputation first."""

    @abc.abstractmethod
    def programs(self, batch: int, seq: int) -> dict[str, Program]:
        """`forward`, `fwd_bwd` and, for models, `train_step`, in that order."""

    @abc.abstractmethod
    def state_bytes(self) -> int:
        """Bytes that stay whatever the sequence: parameters (and optimizer state, models)."""

    @property
    @abc.abstractmethod
    def fit_program(self) -> str:
        """The program whose peak must fit a budget."""

    @property
    @abc.abstractmethod
    def seq_multiple(self) -> int:
        """Sequence lengths the planner tries are multiples of this (the chunk size)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line naming the config."""


def abstract_split(build: Callable[[], nnx.Module]):
    """`(graphdef, params, rest)` of a module built on abstract shapes."""
    return nnx.split(nnx.eval_shape(build), nnx.Param, ...)


def random_like(tree, seed: int = 0):
    """Random arrays with the shapes and dtypes of an abstract pytree."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), max(len(leaves), 1))
    out = []
    for key, x in zip(keys, leaves, strict=False):
        if jnp.issubdtype(x.dtype, jnp.integer):
            out.append(jnp.zeros(x.shape, x.dtype))
        else:
            out.append(jax.random.normal(key, x.shape, x.dtype))
    return jax.tree.unflatten(treedef, out)
