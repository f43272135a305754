"""The train state, its shardings, and the compiled steps, set up from a `TrainConfig`."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from train.optim import make_optimizer, schedule
from train.sharding import batch_sharding, like_params, param_shardings, replicated, under_mesh
from train.step import make_eval_step, make_train_step
from ttt_jax.models import LM, ModelConfig
from ttt_jax.models.retrofit import base_config, new_params, retrofit_params

BATCH_KEYS = ("tokens", "targets", "segment_ids", "loss_mask")


@dataclasses.dataclass
class Setup:
    """Everything the loop needs that does not change during the run.

    Attributes:
      graphdef: the model's structure (merged with params inside the steps).
      logical: pure dict of logical `PartitionSpec`s, one per parameter.
      abstract_state: `ShapeDtypeStruct` tree of the train state, with shardings.
      state_shardings: NamedShardings of the train state.
      tx: the optimizer.
      train_step: jitted `(state, batch) -> (state, metrics)`, state donated.
      eval_step: jitted `(params, batch) -> sums`.
      init_state: `() -> state`, laid out sharded: fresh parameters, or with `init_from` the
        pretrained ones read into their shardings and retrofitted (`train.init_from`).
      batch_sharding: NamedSharding of every `[A, m, T]` batch array.
      lr_schedule: step -> learning rate (for logs).
    """

    graphdef: nnx.GraphDef
    logical: dict
    abstract_state: dict
    state_shardings: dict
    tx: optax.GradientTransformation
    train_step: object
    eval_step: object
    init_state: object
    batch_sharding: NamedSharding
    lr_schedule: object


def _model_params(model_cfg: ModelConfig, seed: int) -> dict:
    return nnx.to_pure_dict(nnx.state(LM(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def make_setup(cfg, mesh: Mesh) -> Setup:
    """Builds shardings from the logical axis rules and jits the steps with explicit in/out
    shardings (`cfg` is a `TrainConfig`)."""
    abstract = nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(cfg.seed)))
    graphdef, abs_state = nnx.split(abstract, nnx.Param)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abs_state))
    abs_params = nnx.to_pure_dict(abs_state)
    p_sh = param_shardings(logical, abs_params, cfg.mesh.rules, mesh)
    trainable = new_params(cfg.model) if cfg.only_new_params else None
    tx = make_optimizer(cfg.optim, cfg.steps, abs_params, logical, trainable)
    rep = replicated(mesh)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    o_sh = like_params(abs_opt, abs_params, p_sh, rep)
    state_sh = {"step": rep, "params": p_sh, "opt_state": o_sh, "skipped": rep}

    def state_of(params):
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "skipped": jnp.zeros((), jnp.int32),
        }

    def init_state():
        return state_of(_model_params(cfg.model, cfg.seed))

    abs_state = jax.eval_shape(init_state)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_state, state_sh
    )
    b_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    train_step = jax.jit(
        under_mesh(
            mesh,
            make_train_step(
                graphdef, tx, cfg.nonfinite == "skip", cfg.data.uses_segments, trainable
            ),
        ),
        in_shardings=(state_sh, b_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        under_mesh(mesh, make_eval_step(graphdef, cfg.data.uses_segments)),
        in_shardings=(p_sh, b_sh),
        out_shardings=rep,
    )
    return Setup(
        graphdef=graphdef,
        logical=logical,
        abstract_state=abstract_state,
        state_shardings=state_sh,
        tx=tx,
        train_step=train_step,
        eval_step=eval_step,
        init_state=(
            jax.jit(init_state, out_shardings=state_sh)
            if cfg.init_from is None
            else _init_from(cfg, mesh, state_of, state_sh)
        ),
        batch_sharding=batch_sharding(mesh),
        lr_schedule=schedule(
            cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio
        ),
    )


def _init_from(cfg, mesh: Mesh, state_of, state_sh):
    """`() -> state` from the pretrained model at `cfg.init_from`: its params read straight into
    the shardings of the model without the retrofit, then retrofitted under jit (the pretrained
    buffers donated) into the run's layout."""
    from train.init_from import load_pretrained_params

    base = base_config(cfg.model)
    abstract = nnx.eval_shape(lambda: LM(base, rngs=nnx.Rngs(cfg.seed)))
    _, abs_state = nnx.split(abstract, nnx.Param)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abs_state))
    base_sh = param_shardings(logical, nnx.to_pure_dict(abs_state), cfg.mesh.rules, mesh)

    def retrofit(pretrained):
        fresh = lambda: _model_params(cfg.model, cfg.seed)  # noqa: E731
        return state_of(retrofit_params(pretrained, cfg.model, fresh=fresh))

    place = jax.jit(retrofit, in_shardings=(base_sh,), out_shardings=state_sh, donate_argnums=0)

    def init_state():
        pretrained = load_pretrained_params(cfg.init_from, base, base_sh)
        with warnings.catch_warnings():
            # The buffers of pretrained weights whose layout the retrofit changes cannot be
            # reused for the output; the others are (that is what donating them is for).
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            return place(pretrained)

    return init_state


def spec_tree(shardings) -> dict:
    """The `PartitionSpec`s of a tree of NamedShardings (for logs and tests)."""
    return jax.tree.map(lambda s: s.spec, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
