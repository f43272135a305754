"""A language model as a memory workload: `ttt_jax.models.LM` trained on `tokens: [B, T]`.

The training step compiled here is the plain one (next-token cross-entropy plus the MLPs'
auxiliary loss, gradients, an optax update), with parameters and optimizer state donated as a
real step donates them, so its peak counts parameters, optimizer state, gradients and every
activation the backward keeps. A trainer with its own loss or optimizer passes them in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ttt_jax.memory.analysis import tree_bytes
from ttt_jax.memory.layer_workload import GROUP_CANDIDATES
from ttt_jax.memory.workload import Program, Remat, Workload, abstract_split
from ttt_jax.models import FAMILIES, LM, ModelConfig
from ttt_jax.ops.core import wide_dtype


def next_token_loss(model: LM, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (the last position predicts nothing) plus the auxiliary
    loss."""
    logits, aux = model(tokens)
    labels = jnp.roll(tokens, -1, axis=1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    mask = (jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1).astype(ce.dtype)
    loss = jnp.sum(ce * mask) / (tokens.shape[0] * (tokens.shape[1] - 1))
    wide = wide_dtype(loss.dtype, aux.dtype)  # what implicit promotion gave: fp32 under bf16
    return loss.astype(wide) + aux.astype(wide)


# AdamW: two fp32 moments per parameter, the optimizer state the planner budgets for by
# default. One instance, so equal configs make equal (and cache-sharing) workloads.
DEFAULT_OPTIMIZER = optax.adamw(1e-3, weight_decay=0.1)


@dataclasses.dataclass(frozen=True)
class ModelWorkload(Workload):
    """An LM config with its training step.

    Attributes:
      config: the `ModelConfig`; its remat settings are `block_remat` and the
        `checkpoint_group` / `remat_policy` options of its recurrent families (one setting for
        all of them: `remat` raises if they differ, `with_remat` sets them all).
      loss: `(model, tokens [B, T]) -> scalar`; the next-token loss by default.
      optimizer: the optax transformation of the step; AdamW by default.
    """

    config: ModelConfig
    loss: Callable[[LM, jax.Array], jax.Array] = next_token_loss
    optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER

    @property
    def scan_options(self) -> tuple[str, ...]:
        """The option sections (`ModelConfig.ttt`, ...) of the recurrent layers in the pattern:
        where the inner-scan knobs that act on this model live."""
        names = {name for parts in self.config.parts for name in parts}
        return tuple(sorted({FAMILIES[n].options for n in names if FAMILIES[n].recurrent}))

    @property
    def recurrent(self) -> bool:
        """Whether any block holds a layer the inner-scan knobs act on."""
        return bool(self.scan_options)

    @property
    def remat(self) -> Remat:
        c = self.config
        block = None if c.block_remat == "none" else c.block_remat
        knobs = {}
        for section in self.scan_options:
            options = getattr(c, section)
            knobs[section] = (options.checkpoint_group, options.remat_policy)
        if len(set(knobs.values())) > 1:
            got = ", ".join(f"{s}: {g}/{p}" for s, (g, p) in knobs.items())
            raise ValueError(
                "the memory tools take one inner-scan setting for the whole model, but the "
                f"recurrent layers' checkpoint_group/remat_policy differ ({got})"
            )
        group, policy = next(iter(knobs.values()), (None, None))
        return Remat(group, policy, block)

    def with_remat(self, remat: Remat) -> ModelWorkload:
        c = self.config
        scans = {
            s: dataclasses.replace(
                getattr(c, s),
                checkpoint_group=remat.checkpoint_group,
                remat_policy=remat.remat_policy,
            )
            for s in self.scan_options
        }
        config = dataclasses.replace(c, block_remat=remat.block_remat or "none", **scans)
        return dataclasses.replace(self, config=config)

    def remat_candidates(self) -> list[Remat]:
        """Preferred first: the fastest scan group with no block remat, then block remat
        keeping the matmul outputs without batch dims (what the weight gradients read: most of
        the recomputation saved), then full block remat (each block keeps only its input), and
        last, with the larger scan group, the least memory."""
        fast, lean = GROUP_CANDIDATES if self.recurrent else (None, None)
        return [
            Remat(fast),
            Remat(fast, block_remat="dots_no_batch"),
            Remat(fast, block_remat="full"),
            *([Remat(lean, block_remat="full")] if lean != fast else []),
        ]

    @property
    def fit_program(self) -> str:
        return "train_step"

    @property
    def seq_multiple(self) -> int:
        c = self.config
        names = {name for parts in c.parts for name in parts}
        return math.lcm(1, *(FAMILIES[n].chunk(c.layer_config(n)) for n in names))

    def describe(self) -> str:
        c = self.config
        pattern = ",".join(c.pattern)
        return (
            f"LM d_model={c.d_model} layers={c.num_layers} heads={c.num_heads} d_ff={c.d_ff} "
            f"vocab={c.vocab_size} pattern=[{pattern}] {c.precision} {self.remat.label()}"
        )

    def _abstract(self):
        graphdef, params, rest = abstract_split(lambda: LM(self.config, rngs=nnx.Rngs(0)))
        opt_state = jax.eval_shape(self.optimizer.init, params)
        return graphdef, params, rest, opt_state

    def state_bytes(self) -> int:
        _, params, _, opt_state = self._abstract()
        return tree_bytes(params) + tree_bytes(opt_state)

    def programs(self, batch: int, seq: int) -> dict[str, Program]:
        graphdef, params, rest, opt_state = self._abstract()
        tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        optimizer, loss_of = self.optimizer, self.loss

        def loss(params, rest, tokens):
            return loss_of(nnx.merge(graphdef, params, rest), tokens)

        def forward(params, rest, tokens):
            return loss(params, rest, tokens)

        def fwd_bwd(params, rest, tokens):
            return jax.value_and_grad(loss)(params, rest, tokens)

        def train_step(params, opt_state, rest, tokens):
            value, grads = jax.value_and_grad(loss)(params, rest, tokens)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        def real_tokens():
            key = jax.random.PRNGKey(1)
            return jax.random.randint(key, tokens.shape, 0, self.config.vocab_size, jnp.int32)

        def real_model():
            _, p, r = nnx.split(LM(self.config, rngs=nnx.Rngs(0)), nnx.Param, ...)
            return p, r

        def real_args():
            p, r = real_model()
            return p, r, real_tokens()

        def real_step_args():
            p, r = real_model()
            return p, optimizer.init(p), r, real_tokens()

        args = (params, rest, tokens)
        return {
            "forward": Program(forward, args, real_args),
            "fwd_bwd": Program(fwd_bwd, args, real_args),
            "train_step": Program(
                train_step, (params, opt_state, rest, tokens), real_step_args, (0, 1)
            ),
        }
