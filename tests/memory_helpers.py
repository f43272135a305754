"""Helpers of the tests/test_memory_*.py files: walking jaxprs, running a function compiled with
the fast CPU options, and the small configs the tests share."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
from flax import nnx
from jax.extend.core import ClosedJaxpr, Jaxpr

from ttt_jax.memory.analysis import compile_lowered
from ttt_jax.models import ModelConfig, preset


def equations(jaxpr) -> Iterator:
    """Every equation of a jaxpr and of the jaxprs nested in its equations (scan bodies, remat,
    custom_vjp, pjit, cond branches)."""
    if isinstance(jaxpr, ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                yield from equations(sub)


def _subjaxprs(value) -> list:
    if isinstance(value, ClosedJaxpr | Jaxpr):
        return [value]
    if isinstance(value, tuple | list):
        return [s for v in value for s in _subjaxprs(v)]
    return []


def init(build) -> tuple:
    """`(graphdef, state)` of the module `build()` makes, its values initialised in one jitted
    call (eager init dispatches every random op alone, which is slow on a busy CPU)."""
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    return graphdef, jax.jit(lambda: nnx.split(build())[1])()


def run_fast(fn, *args):
    """`jax.jit(fn)(*args)`, compiled with the fast CPU options on the CPU (a test spends most of
    its time compiling; the options change nothing the tests look at)."""
    return compile_lowered(jax.jit(fn).lower(*args))(*args)


def small_model(mini_batch_size: int = 4, checkpoint_group: int | None = None, **kw) -> ModelConfig:
    """The `tiny` preset (attention, then TTT-Linear) shrunk to compile in seconds; the two
    arguments are its TTT mixers' options (`ModelConfig.ttt`), `kw` other ModelConfig fields."""
    small = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, precision="fp32")
    ttt = dataclasses.replace(
        preset("tiny").ttt, mini_batch_size=mini_batch_size, checkpoint_group=checkpoint_group
    )
    return dataclasses.replace(preset("tiny"), **{**small, "ttt": ttt, **kw})
