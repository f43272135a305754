"""Argument checks shared by every op.

They run in Python on static shapes and dtypes, so a bad call fails with a `ValueError` that
names the argument before anything is traced or compiled. No op broadcasts silently: every
shape is checked against the one the math needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# The two backward kinds of the families with a manual VJP: their own reverse pass, or JAX's
# autodiff through the checkpointed scan (the twin every manual backward is tested against).
BACKWARDS = ("custom", "autodiff")

# A dimension in an expected shape: an int must match exactly; a str names a dimension that
# must agree with every other occurrence of the same name in one `check_shapes` call.
Dim = int | str


def describe(shape: Sequence[Dim]) -> str:
    return str(tuple(shape)).replace("'", "")


def check_shapes(specs: Sequence[tuple[str, object, Sequence[Dim]]]) -> dict[str, int]:
    """Checks ranks and shapes of several arrays against named dimensions.

    Args:
      specs: `(argument name, array or None, expected shape)`; named dimensions (strings such as
        "B", "T") bind to the first size seen and must agree afterwards. `None` arrays are
        skipped.

    Returns:
      The bound named dimensions, e.g. `{"B": 2, "T": 128, ...}`.

    Raises:
      ValueError: naming the argument, the shape seen and the shape expected.
    """
    bound: dict[str, int] = {}
    first_seen: dict[str, str] = {}
    for name, x, expected in specs:
        if x is None:
            continue
        shape = tuple(jnp.shape(x))
        if len(shape) != len(expected):
            raise ValueError(
                f"{name} must have rank {len(expected)} with shape {describe(expected)}, "
                f"got shape {shape}"
            )
        for axis, (size, want) in enumerate(zip(shape, expected, strict=True)):
            if isinstance(want, int):
                if size != want:
                    raise ValueError(
                        f"{name} has shape {shape} but expected {describe(expected)}: "
                        f"axis {axis} must be {want}"
                    )
            elif want in bound:
                if size != bound[want]:
                    want_shape = [bound.get(d, d) if isinstance(d, str) else d for d in expected]
                    raise ValueError(
                        f"{name} has shape {shape} but {first_seen[want]} gives "
                        f"{want}={bound[want]}: expected {name} shape {describe(want_shape)}"
                    )
            else:
                bound[want] = size
                first_seen[want] = name
    return bound


def check_float(**arrays: object) -> None:
    """Raises if any given array (None skipped) does not have a floating dtype."""
    for name, x in arrays.items():
        if x is None:
            continue
        dtype = jnp.result_type(x)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {dtype}")


def check_float_dtype(name: str, dtype: object) -> jnp.dtype:
    """Returns `jnp.dtype(dtype)` if it names a floating dtype, else raises naming `name`."""
    try:
        value = jnp.dtype(dtype)
    except TypeError:
        value = None
    if value is None or not jnp.issubdtype(value, jnp.floating):
        raise ValueError(f"{name} must be a float dtype, got {dtype!r}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """Returns `value` if it is a positive Python int, else raises naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_optional_positive_int(name: str, value: object) -> int | None:
    return None if value is None else check_positive_int(name, value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value  # type: ignore[return-value]


def check_nonempty(name: str, x: object, dims: Sequence[str] = ("B", "T")) -> None:
    """The leading axes of `x` (named `dims`, e.g. batch and time) must each hold >= 1 element:
    an empty batch or sequence is a caller's mistake, not a call with an empty result."""
    shape = tuple(jnp.shape(x))
    for axis, dim in enumerate(dims[: len(shape)]):
        if shape[axis] < 1:
            raise ValueError(
                f"{name} has shape {shape}: its {dim} axis (axis {axis}) must be >= 1, got 0"
            )


def check_state_type(name: str, value: object, cls: type) -> None:
    """`value` is None or a `cls` (a state pytree of the op's own kind)."""
    if value is not None and not isinstance(value, cls):
        raise ValueError(f"{name} must be {cls.__name__} (or None), got {type(value).__name__}")


def check_policy_names(
    remat_policy: object, names: Sequence[str], where: str, name: str = "remat_policy"
) -> None:
    """A `save_names:` / `offload_names:` policy may only name tags that `where` sets (`names`,
    the family's `NAMES`): an unknown name would silently save nothing."""
    if not isinstance(remat_policy, str):
        return
    for prefix in ("save_names:", "offload_names:"):
        if remat_policy.startswith(prefix):
            asked = [n.strip() for n in remat_policy[len(prefix) :].split(",") if n.strip()]
            unknown = [n for n in asked if n not in names]
            if unknown:
                raise ValueError(
                    f"{name}={remat_policy!r} names {', '.join(map(repr, unknown))}, which "
                    f"{where} does not tag (its names: {', '.join(names) or 'none'})"
                )


def check_finite_number(
    name: str, value: object, *, positive: bool = False, allow_array: bool = False
) -> None:
    """A finite real number (`> 0` with `positive`). With `allow_array`, a concrete 0-d array
    is checked too, and a traced one (a jit argument) is let through: its value is unknown."""
    if allow_array and not isinstance(value, int | float) and jnp.ndim(value) == 0:
        try:
            value = float(value)
        except jax.errors.ConcretizationTypeError:
            return
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value}")


def check_layer_input(x: object, width: int, name: str = "x") -> dict[str, int]:
    """A layer's input: `[B, T, width]`, floating (token ids go through an embedding first;
    no layer casts integers silently), B >= 1 and T >= 1. Returns `{"B": ..., "T": ...}`."""
    dims = check_shapes([(name, x, ("B", "T", width))])
    check_float(**{name: x})
    check_nonempty(name, x)
    return dims


def check_cache(cache: object, cls: type, batch_of, batch: int, name: str = "cache") -> None:
    """`cache` is a `cls` made for this batch size (`batch_of(cache)` its batch)."""
    if not isinstance(cache, cls):
        raise ValueError(f"{name} must be {cls.__name__}, got {type(cache).__name__}")
    if batch_of(cache) != batch:
        raise ValueError(
            f"{name} holds a batch of {batch_of(cache)} but x has batch {batch}: make the cache "
            f"with init_cache({batch})"
        )
