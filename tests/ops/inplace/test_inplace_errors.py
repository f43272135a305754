"""In-Place TTT op (SPEC 3.3): every bad argument is a ValueError naming it, raised before
tracing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from tests.ops.inplace.inplace_helpers import (
    ETA,
    Bn,
    C,
    T,
    make_inputs,
)
from ttt_jax.ops.inplace.op import InPlaceState, inplace_ttt


def bad_cases():
    good = make_inputs()
    yield "chunk_size", dict(chunk_size=0)
    yield "chunk_size", dict(chunk_size=2.0)
    yield "conv_kernel", dict(conv_kernel=good["conv_kernel"][:2])
    yield "conv_kernel", dict(conv_mode="causal_next")
    yield "conv_mode", dict(conv_mode="causal")
    yield "segment_ids", dict(segment_ids=jnp.zeros((Bn, T + 1), jnp.int32))
    yield "segment_ids", dict(segment_ids=jnp.zeros((Bn, T), jnp.float32))
    yield "clip_tau", dict(clip_tau=0.0)
    yield "clip_tau", dict(clip_tau=-1.0)
    yield "eta", dict(eta=jnp.ones((2,)))
    yield "target", dict(target=good["target"][:, :-1])
    yield "w_down", dict(w_down=good["w_down"][:, :-1])
    yield "w_target", dict(w_target=good["w_target"][:-1])
    yield "initial_state.w_down", dict(initial_state=InPlaceState(w_down=good["w_init"][:1]))
    yield "prefix", dict(prefix="parallel")
    yield "backward", dict(backward="manual")
    yield "checkpoint_group", dict(checkpoint_group=0)
    yield "remat_policy", dict(remat_policy="some")
    yield "state_dtype", dict(state_dtype=jnp.int32)
    yield "state_dtype", dict(state_dtype="floaty")


@pytest.mark.parametrize("name,override", list(bad_cases()), ids=lambda x: str(x)[:20])
def test_bad_arguments_raise_value_errors_naming_them_before_tracing(name, override):
    inputs = make_inputs()
    kwargs = dict(
        w_down=inputs["w_down"],
        w_target=inputs["w_target"],
        conv_kernel=inputs["conv_kernel"],
        eta=ETA,
        chunk_size=C,
    )
    kwargs.update(override)
    z, target = inputs["z"], kwargs.pop("target", inputs["target"])

    def traced(z, target):
        return inplace_ttt(z, target, **kwargs)

    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        jax.make_jaxpr(traced)(z, target)
