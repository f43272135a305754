"""The device mesh, and shardings from logical axis names (rules live in the config).

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded), `tensor` (heads / MLP features / vocab split). A parameter dim is sharded over
the mesh axis its logical name maps to, unless the dim's size is not a multiple of that axis (or
the axis is already used by another dim of the same parameter): then it stays replicated, which
is always correct, only less memory-efficient. Batches are split over `(data, fsdp)`.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ttt_jax.models.lm import BATCH_AXES

AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis. Names from ttt_jax.layers.common; `layers` is the scan axis.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("qkv", "tensor"),
    ("head_dim", None),
    ("rank", None),
    ("conv", None),
    ("chunk", None),
)


def mesh_shape(sizes: tuple[int, int, int], n_devices: int) -> tuple[int, int, int]:
    """Resolves one `-1` in `(data, fsdp, tensor)` to fill `n_devices`; checks the product.

    Raises:
      ValueError: naming the axis sizes, the device count and by how much they miss.
    """
    named = dict(zip(AXES, sizes, strict=True))
    fill = [a for a, s in named.items() if s == -1]
    if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {named}: each axis is a positive size, at most one is -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if fill:
        if n_devices % fixed:
            raise ValueError(
                f"mesh {named}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{n_devices} devices (remainder {n_devices % fixed}); axis {fill[0]!r}=-1 "
                "cannot fill them"
            )
        named[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(
            f"mesh {named} has {fixed} devices but there are {n_devices} "
            f"({'more' if fixed > n_devices else 'fewer'} by {abs(fixed - n_devices)}); set one "
            "axis to -1 to fill"
        )
    return tuple(named[a] for a in AXES)


def make_mesh(sizes: tuple[int, int, int], devices=None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all, every process)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, AXES, (AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(logical: P, shape, rules, mesh: Mesh) -> P:
    """Mesh `PartitionSpec` of one parameter from its logical axis names (module docstring)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(logical, shape, strict=True):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
            out.append(None)
            continue
        used.add(axis)
        out.append(axis)
    return P(*out)


def param_shardings(logical_specs, abstract_params, rules, mesh: Mesh):
    """NamedShardings for a pure-dict param tree, given its tree of logical `PartitionSpec`s."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_spec(spec, x.shape, rules, mesh)),
        logical_specs,
        abstract_params,
        is_leaf=lambda s: isinstance(s, P),
    )


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def like_params(abstract_tree, abstract_params, param_shardings_, default: NamedSharding):
    """Shardings for a tree holding copies of the params (an optimizer state): a leaf whose
    key path ends with a parameter's path and has its shape is laid out like it (Adam or Muon
    moments), every other leaf (counts, scalars) gets `default`.

    Matching paths, not `optax.tree_map_params`, works for any optimizer, including those
    whose state is built from per-parameter label trees (Muon).
    """
    index = {
        _path_keys(path): (x.shape, sh)
        for (path, x), sh in zip(
            jax.tree_util.tree_leaves_with_path(abstract_params),
            jax.tree.leaves(param_shardings_, is_leaf=lambda s: isinstance(s, NamedSharding)),
            strict=True,
        )
    }

    def pick(path, leaf):
        keys = _path_keys(path)
        for i in range(len(keys)):
            shape, sh = index.get(keys[i:], (None, None))
            if sh is not None and shape == leaf.shape:
                return sh
        return default

    return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """`[A, B, T]` micro-batched arrays: the batch dim over (data, fsdp)."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> int:
    """The micro-batch size; raises if the batch does not split over accumulation and mesh."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % grad_accum:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by grad_accum={grad_accum} "
            f"(remainder {batch_size % grad_accum})"
        )
    micro = batch_size // grad_accum
    if micro % ways:
        raise ValueError(
            f"micro-batch {micro} (batch_size={batch_size} / grad_accum={grad_accum}) is not "
            f"divisible by the batch axes data*fsdp = {mesh.shape['data']}*{mesh.shape['fsdp']}"
            f" = {ways} (remainder {micro % ways})"
        )
    return micro


def under_mesh(mesh: Mesh, fn):
    """`fn` traced with `mesh` as the abstract mesh in context, so that the model's
    `constrain_batch` keeps activations split over the batch axes."""

    @functools.wraps(fn)
    def wrapped(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return wrapped
