"""A matmul whose backward runs at a chosen operand dtype (issue 18: LaCT's backward GEMMs).

`ttt_jax.ops.core.matmul` with bf16 operands is a `bf16 x bf16 -> fp32` dot. Its autodiff
transpose multiplies the fp32 cotangent with the other operand *converted to fp32*: an fp32
GEMM at DEFAULT precision, which a Hopper GPU runs as TF32 (at most half the bf16 tensor-core
rate, twice the operand bytes). In LaCT's custom backward those transposes are 288 of the 512
GEMM units a forward+backward executes (benchmarks/RESULTS.md, "LaCT performance").

`mixed_matmul(..., backward_dtype=bf16)` computes the same forward and gives each transpose
bf16 operands (the cotangent rounded to bf16, the saved operand as the forward cast it) with
fp32 accumulation, the rounding points of a bf16 training step. Only a matmul whose compute
dtype is narrower than its accumulation dtype takes the custom rule; fp32 and fp64 matmuls
are `core.matmul` itself, so their forward and backward are exactly the plain ones.
The rule is a `jax.custom_vjp`: reverse mode (and reverse over reverse) only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ops.core.numerics import matmul, wide_dtype


def _transposed_specs(spec: str) -> tuple[str, str]:
    """For `"X,Y->Z"`, the specs of the two cotangents: `"Z,Y->X"` and `"X,Z->Y"`.

    Valid when every index of an operand is in the other operand or the output (no index
    summed over one operand alone), which every LaCT matmul satisfies.
    """
    inputs, z = spec.replace(" ", "").split("->")
    x, y = inputs.split(",")
    letters = lambda s: set(s.replace("...", ""))  # noqa: E731
    for own, other in ((x, y), (y, x)):
        if letters(own) - letters(other) - letters(z):
            raise ValueError(f"mixed_matmul: {spec!r} sums an index over one operand alone")
    return f"{z},{y}->{x}", f"{x},{z}->{y}"


def _dot(spec, a, b, dtype):
    """`einsum` of `a, b` rounded to `dtype`, accumulated in fp32 (wide for fp64)."""
    wide = wide_dtype(dtype)
    a, b = a.astype(dtype), b.astype(dtype)

    def narrow():
        return jnp.einsum(spec, a, b, preferred_element_type=wide)

    def exact():
        # XLA:CPU's DotThunk cannot run some bf16 x bf16 -> fp32 layouts ("Unsupported element
        # type for DotThunk::Execute", jaxlib 0.10.2): the CPU multiplies the rounded values in
        # fp32, the same products (bf16 values are exact in fp32) with the same accumulation.
        return jnp.einsum(
            spec,
            a.astype(wide),
            b.astype(wide),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=wide,
        )

    if jnp.dtype(dtype) == wide:
        return narrow()
    return lax.platform_dependent(cpu=exact, default=narrow)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def _narrow(spec, a, b, compute_dtype, backward_dtype, primal_dtypes):
    return matmul(spec, a, b, compute_dtype)


def _narrow_fwd(spec, a, b, compute_dtype, backward_dtype, primal_dtypes):
    # Saved in the compute dtype, what the forward read (half the bytes of fp32 state).
    a_c, b_c = a.astype(compute_dtype), b.astype(compute_dtype)
    return matmul(spec, a_c, b_c, compute_dtype), (a_c, b_c)


def _narrow_bwd(spec, compute_dtype, backward_dtype, primal_dtypes, res, ct):
    a_c, b_c = res
    spec_a, spec_b = _transposed_specs(spec)
    # Each cotangent in its primal's dtype: the fp32 state gets an fp32 cotangent back.
    ga = _dot(spec_a, ct, b_c, backward_dtype).astype(primal_dtypes[0])
    gb = _dot(spec_b, a_c, ct, backward_dtype).astype(primal_dtypes[1])
    return ga, gb


_narrow.defvjp(_narrow_fwd, _narrow_bwd)


def mixed_matmul(spec: str, a: jax.Array, b: jax.Array, compute_dtype, backward_dtype=None):
    """`core.matmul(spec, a, b, compute_dtype)`; with `backward_dtype` and a compute dtype
    narrower than fp32, the backward's two matmuls take `backward_dtype` operands (module
    docstring). None, or a wide compute dtype: exactly `core.matmul` (plain autodiff)."""
    cd = jnp.dtype(compute_dtype)
    if backward_dtype is None or wide_dtype(cd) == cd:
        return matmul(spec, a, b, cd)
    _transposed_specs(spec)
    return _narrow(spec, a, b, cd, jnp.dtype(backward_dtype), (a.dtype, b.dtype))
