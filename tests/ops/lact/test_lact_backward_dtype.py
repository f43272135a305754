"""LaCT's `backward_dtype` (issue 18): bf16 operands for the backward's matmuls under bf16
compute (`ttt_jax/ops/lact/mixed_matmul.py`).

Plain autodiff of a `bf16 x bf16 -> fp32` matmul gives fp32 x fp32 transposes (TF32 on a
Hopper GPU, 288 of the 512 GEMM units of a forward+backward at the issue's shape); with
`backward_dtype="bfloat16"` every transpose rounds its cotangent to bf16 and accumulates in
fp32. Gradients against the fp32 op on the same bf16-valued inputs, measured on the CPU (which
multiplies the rounded values exactly in fp32, `mixed_matmul._dot`), seeds 0-2, B=2, T=64,
H=2, D=Dh=16, C=16, momentum and weight norm:

| backward matmuls | max relative error over q, k, v, rates, momentum, w0, w1, w2 |
|---|---|
| fp32 (None, plain autodiff) | 4.4-5.0e-3 |
| bf16 (`backward_dtype="bfloat16"`) | 4.3-4.9e-3 |

Under Muon with the default fp32 update direction only the read's matmuls are bf16 (3.8-4.2e-3
either way). The bf16 rounding of the forward (state and activations rounded to bf16 for every
matmul) dominates; the backward's own rounding adds little.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from ttt_jax.ops import lact_swiglu
from ttt_jax.testing import GPU_BF16_TOL, rel_err

TOKENS = ("q", "k", "v")


def make_inputs(seed, b=2, t=64, h=2, d=16, dtype=jnp.bfloat16):
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    n = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape)  # noqa: E731
    tokens = {x: (n((b, t, h, d)) / (1.0 if x == "v" else d**0.5)).astype(dtype) for x in TOKENS}
    rates = {f"lr{j}": 0.2 * jax.nn.sigmoid(n((b, t, h))) for j in range(3)}
    eye = 0.5 * jnp.eye(d, d)
    w = {"w0": eye + n((h, d, d), 0.1), "w1": n((h, d, d), d**-0.5), "w2": eye + n((h, d, d), 0.1)}
    return tokens, rates, jax.nn.sigmoid(n((b, t, h))), w, n((b, t, h, d))


@functools.partial(jax.jit, static_argnames=("backward_dtype", "use_muon", "chunk"))
def grads(tokens, rates, beta, w, probe, backward_dtype=None, use_muon=False, chunk=16):
    def loss(tokens, rates, beta, w):
        o, s = lact_swiglu(
            *(tokens[x] for x in TOKENS),
            *(rates[f"lr{j}"] for j in range(3)),
            momentum=beta,
            **w,
            chunk_size=chunk,
            use_muon=use_muon,
            backward_dtype=backward_dtype,
        )
        return jnp.sum(o.astype(jnp.float32) * probe) + jnp.sum(s.w1)

    return jax.grad(loss, argnums=(0, 1, 2, 3))(tokens, rates, beta, w)


def gradient_errors(seed, backward_dtype, use_muon=False, **shape):
    """Relative error of every gradient of the bf16 op against the fp32 op's."""
    tokens, rates, beta, w, probe = make_inputs(seed, **shape)
    chunk = 16 if not shape else shape["t"] // 4
    kw = dict(use_muon=use_muon, chunk=chunk)
    got = grads(tokens, rates, beta, w, probe, backward_dtype=backward_dtype, **kw)
    tokens32 = {x: v.astype(jnp.float32) for x, v in tokens.items()}
    want = grads(tokens32, rates, beta, w, probe, **kw)
    assert got[0]["q"].dtype == jnp.bfloat16 and got[3]["w0"].dtype == jnp.float32
    paths = jax.tree_util.tree_flatten_with_path(got)[0]
    return {
        jax.tree_util.keystr(p): rel_err(g.astype(jnp.float32), r)
        for (p, g), r in zip(paths, jax.tree.leaves(want), strict=True)
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_backward_keeps_every_gradient_in_the_bf16_tolerance(seed):
    today, fast = gradient_errors(seed, None), gradient_errors(seed, "bfloat16")
    assert max(fast.values()) <= GPU_BF16_TOL, fast
    # The backward's own rounding adds little to the forward's (module docstring).
    assert max(fast.values()) <= 1.5 * max(today.values()), (fast, today)


def _dot_operands(fn, args, platform):
    """`(lhs, rhs)` tensor types of every dot_general of `fn` lowered for `platform`."""
    text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
    return re.findall(r"stablehlo.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)


def _loss(dtype, **knobs):
    def loss(q, k, v, lr0, lr1, lr2, beta, w0, w1, w2):
        o, s = lact_swiglu(
            q, k, v, lr0, lr1, lr2, momentum=beta, w0=w0, w1=w1, w2=w2, chunk_size=8, **knobs
        )
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s.w0)

    return jax.grad(loss, argnums=tuple(range(10)))


def _abstract(dtype, wide=jnp.float32):
    sds = jax.ShapeDtypeStruct
    b, t, h, d = 1, 20, 2, 8
    return [sds((b, t, h, d), dtype)] * 3 + [sds((b, t, h), wide)] * 4 + [sds((h, d, d), wide)] * 3


def test_bf16_backward_leaves_no_fp32_dot_on_the_gpu():
    """What a GPU compiles (lowered for CUDA here): with `backward_dtype="bfloat16"` no dot of
    the forward+backward has an fp32 operand; by default the 12 transposes of the backward do."""
    args = _abstract(jnp.bfloat16)
    fp32 = lambda ops: sum("f32>" in a or "f32>" in b for a, b in ops)  # noqa: E731
    today = _dot_operands(_loss(jnp.bfloat16), args, "cuda")
    fast = _dot_operands(_loss(jnp.bfloat16, backward_dtype="bfloat16"), args, "cuda")
    assert len(today) == len(fast) and fp32(today) >= 12 and fp32(fast) == 0, (today, fast)


def test_wide_compute_and_float32_are_plain_autodiff():
    """fp32 and fp64 compute ignore `backward_dtype`; "float32" under bf16 compute is None.
    The lowered programs are the same text."""

    def text(dtype, wide=jnp.float32, **knobs):
        lowered = jax.jit(_loss(dtype, **knobs)).lower(*_abstract(dtype, wide))
        return lowered.as_text(debug_info=False)

    assert text(jnp.float32, backward_dtype="bfloat16") == text(jnp.float32)
    assert text(jnp.bfloat16, backward_dtype="float32") == text(jnp.bfloat16)
    with jax.enable_x64(True):
        f64 = jnp.float64
        assert text(f64, f64, backward_dtype="bfloat16", state_dtype=f64) == text(
            f64, f64, state_dtype=f64
        )


def test_bad_backward_dtype_is_a_value_error():
    tokens, rates, beta, w, _ = make_inputs(0)
    with pytest.raises(ValueError, match="backward_dtype must be a float dtype, got 'int8'"):
        lact_swiglu(*tokens.values(), *rates.values(), **w, chunk_size=16, backward_dtype="int8")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("use_muon", [False, True])
def test_bf16_backward_gradients_on_gpu(use_muon):
    """The same claim on the GPU's bf16 tensor cores, at a larger shape (D = 64, 8 chunks)."""
    shape = dict(b=2, t=512, h=2, d=64)
    today = gradient_errors(0, None, use_muon, **shape)
    fast = gradient_errors(0, "bfloat16", use_muon, **shape)
    assert max(fast.values()) <= GPU_BF16_TOL, fast
    assert max(fast.values()) <= 1.5 * max(today.values()), (fast, today)
