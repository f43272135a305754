"""Per-array checksums of the train state, computed on the devices where the arrays live.

Each array's bytes are read as 32-bit words `w_i` (16- and 8-bit types widened, 64-bit types
split in two) at their row-major position `i`, and summed twice modulo 2**32:

    a = sum_i w_i * (2 i + 1)
    b = sum_i (w_i xor (i * 0x9E3779B1)) * ((i * 0x85EBCA6B) | 1)

Both weights are odd, so multiplying by them is a bijection modulo 2**32: changing any single
word (a flipped bit or byte, one wrong value) always changes both sums, and unrelated garbage
matches both with probability about 2**-64. Integer addition modulo 2**32 is exact and
associative, so the result does not depend on the order of the reduction, hence not on the
sharding, the device count or the backend: a state saved on 8 GPUs verifies when restored on
one CPU. The position index is built from iotas in the array's own shape (no reshape), so a
sharded array is summed in place and only two words per array leave each device. This is not a
cryptographic hash; it detects corruption, not tampering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

ALGORITHM = "sum32x2-v1"

_MIX_XOR = np.uint32(0x9E3779B1)
_MIX_MUL = np.uint32(0x85EBCA6B)


def _words(x: jax.Array) -> jax.Array:
    """The array's bytes as uint32 words (a trailing axis of 2 for 64-bit dtypes)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    if size == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)
    raise ValueError(f"no checksum for dtype {x.dtype} (itemsize {size})")


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major position of every element, modulo 2**32, in `shape` (uint32)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def array_checksum(x: jax.Array) -> jax.Array:
    """`[2]` uint32: the two sums of the module docstring."""
    w = _words(x)
    i = _flat_index(w.shape)
    a = jnp.sum(w * (i * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum((w ^ (i * _MIX_XOR)) * ((i * _MIX_MUL) | np.uint32(1)), dtype=jnp.uint32)
    return jnp.stack([a, b])


def leaf_paths(tree) -> list[str]:
    """`a/b/0/c` names of the leaves, in `jax.tree.leaves` order."""
    paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in paths]


def _replicated(tree):
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def tree_checksums(tree) -> dict[str, str]:
    """`{leaf path: 16 hex digits}` of every array in `tree` (one jitted call, cached)."""
    leaves = jax.tree.leaves(tree)
    out = _jitted(_replicated(tree))(leaves)
    sums = jax.device_get(out)
    return {
        path: f"{int(s[0]):08x}{int(s[1]):08x}"
        for path, s in zip(leaf_paths(tree), sums, strict=True)
    }


_CACHE: dict = {}


def _jitted(out_sharding):
    if out_sharding not in _CACHE:
        fn = lambda leaves: [array_checksum(x) for x in leaves]  # noqa: E731
        kw = {} if out_sharding is None else {"out_shardings": out_sharding}
        _CACHE[out_sharding] = jax.jit(fn, **kw)
    return _CACHE[out_sharding]
