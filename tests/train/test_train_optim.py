"""The optimizer and the step: the weight-decay mask skips norms, biases and fast-weight initial
values; Muon takes projection matrices only; warmup + cosine; gradient accumulation gives the
one-big-batch step; a skipped non-finite step leaves the state untouched."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.batching import sharded_batch
from train.config import MeshConfig, OptimConfig, TrainConfig
from train.optim import decay_mask, muon_dims, schedule
from train.sharding import make_mesh
from train.state import make_setup
from ttt_jax.data import Batches, DataConfig, make_dataset
from ttt_jax.models import LM, LaCTOptions
from ttt_jax.testing import micro_model, rel_err

MICRO = micro_model(vocab_size=32)
# The step's arithmetic does not depend on the mixer: attention-only compiles fastest.
STEP_MODEL = dataclasses.replace(MICRO, pattern=("attention/swiglu",))
DATA = DataConfig(source="mqar", mqar_pairs=3, mqar_vocab=32)


def abstract(cfg):
    state = nnx.state(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def test_decay_mask_and_muon_choose_by_logical_axes():
    cfg = dataclasses.replace(MICRO, pattern=("attention/swiglu", "ttt_linear/npt", "lact/swiglu"),
                              num_layers=3, lact=LaCTOptions(chunk_size=8))  # fmt: skip
    params, specs = abstract(cfg)
    mask, dims = decay_mask(params, specs), muon_dims(params, specs)
    attn, ttt, lact = (mask["groups"]["blocks"][i] for i in range(3))
    assert attn["mixer"]["W_q"] and attn["mlp"]["W_down"] and mask["embed"]
    assert not attn["mixer_norm"] and not mask["final_norm"]
    assert not ttt["mixer"]["W1"] and not ttt["mixer"]["b1"]  # fast-weight initial values
    assert all(not lact["mixer"][n] for n in ("w1", "w0_left", "w0_right", "w2_left"))
    assert lact["mixer"]["W_qkv"] and lact["mixer"]["W_lr"]
    assert not any(lact["mixer"][n] for n in ("ttt_norm", "ttt_scale", "b_lr"))
    assert not ttt["mixer"]["ttt_norm_scale"] and not ttt["mixer"]["conv_q_w"]
    assert ttt["mlp"]["A"] and ttt["mlp"]["B"]  # NPT's low-rank factors are projections
    wq = dims["groups"]["blocks"][0]["mixer"]["W_q"]  # [layers, d, H, Dh]
    assert wq.reduction_axis == (1,) and wq.output_axis == (2, 3)
    assert dims["embed"] is None and dims["groups"]["blocks"][1]["mixer"]["W1"] is None


def test_warmup_then_cosine_to_the_floor():
    s = schedule(1e-3, warmup=10, total=110, min_ratio=0.1)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(5e-4)
    assert float(s(10)) == pytest.approx(1e-3)
    assert float(s(60)) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-5)
    assert float(s(110)) == pytest.approx(1e-4)


def one_step(grad_accum: int, *, muon=False, nonfinite="stop", poison=False):
    cfg = TrainConfig(model=STEP_MODEL, data=DATA, seq=16, batch_size=8, grad_accum=grad_accum,
                      steps=4, optim=OptimConfig(warmup_steps=0, muon=muon),
                      mesh=MeshConfig(data=1), nonfinite=nonfinite)  # fmt: skip
    setup = make_setup(cfg, make_mesh(cfg.mesh.sizes, jax.devices()[:1]))
    batches = Batches(make_dataset(DATA, 16).train, 8)
    batch = sharded_batch(batches, 0, grad_accum, setup.batch_sharding)
    if poison:
        batch["loss_mask"] = batch["loss_mask"] * jnp.float32(jnp.nan)
    before = jax.tree.map(np.asarray, setup.init_state()["params"])
    state, m = setup.train_step(setup.init_state(), batch)
    return before, jax.tree.map(np.asarray, state), {k: float(v) for k, v in m.items()}


def test_gradient_accumulation_equals_one_big_batch():
    _, one, m1 = one_step(1)
    _, acc, m4 = one_step(4)
    assert m4["loss"] == pytest.approx(m1["loss"], rel=1e-6)
    assert m4["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(acc["params"]), jax.tree.leaves(one["params"]), strict=True):
        assert rel_err(a, b) < 1e-5


def test_muon_step_and_nonfinite_skip():
    before, state, m = one_step(1, muon=True)
    assert np.isfinite(m["loss"]) and int(state["step"]) == 1
    moved = [rel_err(a, b) for a, b in zip(jax.tree.leaves(state["params"]),
                                           jax.tree.leaves(before), strict=True)]  # fmt: skip
    assert min(moved) > 0
    before, state, m = one_step(1, nonfinite="skip", poison=True)
    assert not np.isfinite(m["loss"]) and int(state["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
