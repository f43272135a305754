"""What the TTT kernel benchmarks (`bench_ttt_kernel.py`, `bench_ttt_mlp_kernel.py`) share: the
12 x 64 goal shapes, the XLA path's knobs, the timed pair of jitted functions (forward, and
forward+backward w.r.t. every input and parameter), and the flags that pick shapes and modes."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from harness import compile_and_time, parse_shapes, ttt_op_inputs

C = 16
# The issues' goal shapes first (12 x 64 at T=32768), so a time budget cuts the least needed.
SHAPES_12x64 = [(8, 32768, 12, 64), (1, 32768, 12, 64), (8, 8192, 12, 64), (1, 8192, 12, 64)]
XLA_GROUP, XLA_UNROLL = 4, 4  # the layer default (benchmarks/RESULTS.md, issue 2)
MODES = ("fwd", "fwdbwd")


def xla_forward(op, fields: tuple[str, ...]) -> Callable:
    """`(q, k, v, eta, params) -> (o, *final state)` through the XLA op at the layer default."""

    def forward(q, k, v, eta, p):
        o, s = op(
            q, k, v, eta, **p, mini_batch_size=C, checkpoint_group=XLA_GROUP, unroll=XLA_UNROLL
        )
        return (o, *(getattr(s, n) for n in fields))

    return forward


def kernel_operands(q, p: dict, fields: tuple[str, ...]):
    """`(initial state, token_scale)` of a kernel call: the params' `fields` broadcast over the
    batch, and the default `1 / (i + 1)` token scale (fp32)."""
    import jax.numpy as jnp

    b = q.shape[0]
    state = tuple(jnp.broadcast_to(p[n], (b, *p[n].shape)) for n in fields)
    return state, 1.0 / jnp.arange(1, C + 1, dtype=jnp.float32)


def timed(forward: Callable, shape, params: dict[str, tuple], iters: int, modes) -> dict:
    """Compiles and times `forward(q, k, v, eta, params) -> (o, *final state)` (`fwd`) and the
    gradient of `sum(o) + sum of the state` w.r.t. all five arguments (`fwdbwd`), for the
    `modes` asked, on `ttt_op_inputs(*shape, params)` (`harness.compile_and_time` fields)."""
    import jax
    import jax.numpy as jnp

    def loss(q, k, v, eta, p):
        o, *s = forward(q, k, v, eta, p)
        return jnp.sum(o.astype(jnp.float32)) + sum(jnp.sum(x) for x in s)

    inputs, values = ttt_op_inputs(*shape, params)
    fns = {"fwd": jax.jit(forward), "fwdbwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))}
    return compile_and_time({m: fns[m] for m in MODES if m in modes}, (*inputs, values), iters)


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """`--modes`, `--shapes`, `--iters`."""
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--shapes", nargs="+", default=None, help="BxTxHxD, e.g. 8x32768x12x64")
    p.add_argument("--iters", type=int, default=5)


def shapes_of(a: argparse.Namespace, default: list[tuple]) -> list[tuple]:
    """`--shapes`, or `default` when not given."""
    return parse_shapes(a.shapes) if a.shapes else default
