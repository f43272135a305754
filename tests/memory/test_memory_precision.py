"""The mixed-precision policy (SPEC 4, issue 6): under BF16 every layer keeps its parameters,
its fast-weight state and its norms in fp32 while its matmuls run in bf16.

Judged on the jaxpr of the forward (nothing compiled): parameters are fp32 leaves; every float
carry of every scan (the chunk scans carry the fast weights) is fp32, and so is the state the
layer returns; every `rsqrt` (the norms: LayerNorm, RMSNorm, the TTT inner LayerNorm) reads
fp32; and at least one matmul reads bf16, so the policy is really in force.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tests.memory_helpers import equations, small_model
from ttt_jax.layers import (
    BF16,
    NPTMLP,
    InPlaceMLP,
    InPlaceMLPConfig,
    NPTBlock,
    NPTBlockConfig,
    NPTMLPConfig,
    TTTConfig,
    TTTLayer,
)
from ttt_jax.models import LM, InPlaceOptions

B, T, D = 2, 32, 32


def layers():
    ttt = dict(d_model=D, num_heads=2, mini_batch_size=8, precision=BF16)
    npt = NPTMLPConfig(d_model=D, d_ff=64, precision=BF16)
    return {
        "ttt_linear": (lambda: TTTLayer(TTTConfig(inner="linear", **ttt), rngs=nnx.Rngs(0)), 1),
        "ttt_mlp": (lambda: TTTLayer(TTTConfig(inner="mlp", **ttt), rngs=nnx.Rngs(0)), 1),
        "inplace": (
            lambda: InPlaceMLP(
                InPlaceMLPConfig(
                    d_model=D, d_ff=64, chunk_size=8, target_source="input", precision=BF16
                ),
                rngs=nnx.Rngs(0),
            ),
            0,
        ),
        "npt": (lambda: NPTMLP(npt, rngs=nnx.Rngs(0)), 0),
        "npt_block": (
            lambda: NPTBlock(NPTBlockConfig(num_heads=2, head_dim=16, mlp=npt), rngs=nnx.Rngs(0)),
            1,
        ),
    }


def call(layer, x):
    if isinstance(layer, NPTMLP):
        return layer(x, x)[0]
    if isinstance(layer, NPTBlock):
        return layer(x)[0]
    return layer(x)


def precision_facts(fn, *args) -> dict:
    """Dtypes the policy constrains, read off the jaxpr of `fn(*args)`."""
    eqns = list(equations(jax.make_jaxpr(fn)(*args)))
    carries = []
    for e in eqns:
        if e.primitive.name == "scan":
            start = e.params["num_consts"]
            carries += [v.aval for v in e.invars[start : start + e.params["num_carry"]]]
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    return dict(
        float_carries=[a for a in carries if jnp.issubdtype(a.dtype, jnp.floating)],
        rsqrt_inputs=[e.invars[0].aval.dtype for e in eqns if e.primitive.name == "rsqrt"],
        bf16_dots=sum(any(v.aval.dtype == jnp.bfloat16 for v in e.invars) for e in dots),
    )


def abstract(build):
    """`(graphdef, state)` of a module built on abstract shapes (eager init is slow on a CPU);
    checks on the way that every parameter is fp32."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    params = jax.tree.leaves(nnx.state(nnx.merge(graphdef, state), nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)
    return graphdef, state


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp", "inplace", "npt", "npt_block"])
def test_bf16_keeps_params_state_and_norms_fp32(name):
    build, has_norms = layers()[name]
    graphdef, state = abstract(build)

    def forward(state, x):
        return call(nnx.merge(graphdef, state), x)

    x = jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16)
    assert jax.eval_shape(forward, state, x).dtype == jnp.bfloat16
    facts = precision_facts(forward, state, x)
    assert facts["bf16_dots"] > 0
    assert all(d == jnp.float32 for d in facts["rsqrt_inputs"]), facts["rsqrt_inputs"]
    # The norms are there to be checked (the inplace and NPT MLPs have none of their own:
    # the block around them normalises).
    assert bool(facts["rsqrt_inputs"]) == bool(has_norms)
    if name in ("ttt_linear", "ttt_mlp", "inplace"):
        # What the layer hands back is fp32, and the chunk scan carries each state array in
        # fp32 (In-Place also carries a bf16 copy beside it for the read matmul: a copy of the
        # fp32 state made after each update, never accumulated into).

        def final_state(state, x):
            layer = nnx.merge(graphdef, state)
            if name == "inplace":
                return layer.prefill(x)[1].w
            return layer.decode(x, layer.init_cache(B))[1].state

        states = jax.eval_shape(final_state, state, x)
        carried = {(a.shape, a.dtype) for a in facts["float_carries"]}
        for s in jax.tree.leaves(states):
            assert s.dtype == jnp.float32
            assert (s.shape, jnp.dtype(jnp.float32)) in carried, (s.shape, carried)
        if name != "inplace":
            assert all(a.dtype == jnp.float32 for a in facts["float_carries"])


def test_bf16_model_keeps_params_state_and_norms_fp32():
    config = small_model(
        precision="bf16",
        pattern=("attention/npt", "ttt_linear/inplace_ttt", "ttt_mlp/swiglu"),
        num_layers=3,
        inplace=InPlaceOptions(chunk_size=8),
    )
    graphdef, state = abstract(lambda: LM(config, rngs=nnx.Rngs(0)))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    facts = precision_facts(lambda s, t: nnx.merge(graphdef, s)(t)[0], state, tokens)
    assert facts["bf16_dots"] > 0
    assert facts["rsqrt_inputs"] and all(d == jnp.float32 for d in facts["rsqrt_inputs"])
    # The layer scan carries the residual stream in bf16 by design; inside it the chunk scans
    # carry the fast weights in fp32: TTT-Linear's W1 [B, H, D, D], TTT-MLP's W1 [B, H, D, 4D],
    # In-Place's [B, d, F].
    h, dh = config.num_heads, config.head_dim
    carried = {(a.shape, a.dtype) for a in facts["float_carries"]}
    for shape in ((B, h, dh, dh), (B, h, dh, 4 * dh), (B, D, config.d_ff)):
        assert (shape, jnp.dtype(jnp.float32)) in carried, (shape, carried)
        assert (shape, jnp.dtype(jnp.bfloat16)) not in carried or shape == (B, D, config.d_ff)
