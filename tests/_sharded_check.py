"""Run in a subprocess with 8 fake CPU devices (tests/train/test_train_sharding.py): one train step
on a (data=2, fsdp=2, tensor=2) mesh against the same step on one device; prints JSON."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np

from train.batching import sharded_batch
from train.config import MeshConfig, TrainConfig
from train.sharding import make_mesh
from train.state import make_setup, spec_tree
from ttt_jax.data import Batches, DataConfig, make_dataset
from ttt_jax.testing import micro_model

model = micro_model(vocab_size=32)
data = DataConfig(source="mqar", mqar_pairs=3, mqar_vocab=32)
base = TrainConfig(model=model, data=data, seq=16, batch_size=8, grad_accum=2, steps=4)
batches = Batches(make_dataset(data, 16).train, 8)


def two_steps(cfg, devices):
    mesh = make_mesh(cfg.mesh.sizes, devices)
    setup = make_setup(cfg, mesh)
    state = setup.init_state()
    losses = []
    for n in range(2):
        state, m = setup.train_step(
            state, sharded_batch(batches, n, cfg.grad_accum, setup.batch_sharding)
        )
        losses.append(float(m["loss"]))
    params = jax.tree.map(np.asarray, state["params"])
    return setup, state, losses, params


single = dataclasses.replace(base, mesh=MeshConfig(data=1, fsdp=1, tensor=1))
_, _, loss1, p1 = two_steps(single, jax.devices()[:1])
sharded = dataclasses.replace(base, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
setup, state, loss8, p8 = two_steps(sharded, jax.devices())
err = max(
    float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True)
)


def step_temp_bytes(mesh_cfg):
    """Per-device temporaries of the compiled train step (abstract state, one real batch)."""
    cfg = dataclasses.replace(base, seq=64, batch_size=16, mesh=mesh_cfg)
    setup = make_setup(cfg, make_mesh(cfg.mesh.sizes, jax.devices()))
    batch = sharded_batch(Batches(make_dataset(data, 64).train, 16), 0, 2, setup.batch_sharding)
    compiled = setup.train_step.lower(setup.abstract_state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


temp_dp8 = step_temp_bytes(MeshConfig(data=8, fsdp=1, tensor=1))
temp_fsdp8 = step_temp_bytes(MeshConfig(data=1, fsdp=8, tensor=1))
specs = spec_tree(setup.state_shardings["params"])
actual = jax.tree.map(lambda x: x.sharding.spec, state["params"])
mu = state["opt_state"][1][0].mu
print(
    json.dumps(
        {
            "devices": jax.device_count(),
            "loss1": loss1,
            "loss8": loss8,
            "param_rel_err": err,
            "embed": list(specs["embed"]),
            "w_q": list(specs["groups"]["blocks"][0]["mixer"]["W_q"]),
            "w_o": list(specs["groups"]["blocks"][0]["mixer"]["W_o"]),
            "ttt_W1": list(specs["groups"]["blocks"][1]["mixer"]["W1"]),
            "mlp_down": list(specs["groups"]["blocks"][0]["mlp"]["W_down"]),
            "norm": list(specs["final_norm"]),
            "actual_equals_rules": jax.tree.leaves(
                jax.tree.map(lambda a, b: a == b, actual, specs)
            ),
            "mu_w_q": list(mu["groups"]["blocks"][0]["mixer"]["W_q"].sharding.spec),
            "batch": list(setup.batch_sharding.spec),
            "temp_dp8": temp_dp8,
            "temp_fsdp8": temp_fsdp8,
        }
    )
)
