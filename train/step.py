"""The jitted train and eval steps: pure functions of `(state, batch)`.

`state = {"step", "params", "opt_state", "skipped"}` (pure pytrees of arrays; the model's
`nnx.GraphDef` is closed over). A batch holds `[A, m, T]` arrays: A micro-batches of m rows.
The loss is the mean next-token cross-entropy over every unmasked target of the whole global
batch plus the MLPs' auxiliary loss: each micro-batch contributes `sum of its token losses / N`
(N the global count of unmasked targets, known from the batch before any compute), so
accumulating gradients over micro-batches gives exactly the gradient of the one big batch.

Frozen parameters (`--only-new-params`) are read through `stop_gradient`: their gradient is
zero by construction, so XLA drops the weight-gradient matmuls it would otherwise compute and
throw away (activation gradients still flow through them to the trainable layers below).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def token_losses(
    graphdef: nnx.GraphDef, params, micro: dict, segments: bool = True
) -> tuple[jax.Array, ...]:
    """`(sum of masked NLL, number correct, aux)` for one micro-batch (fp32 scalars).

    `segments=False` withholds the segment ids from the model (`DataConfig.segments`).
    """
    model = nnx.merge(graphdef, params)
    logits, aux = model(micro["tokens"], micro["segment_ids"] if segments else None)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, micro["targets"][..., None], axis=-1)[..., 0]
    mask = micro["loss_mask"]
    correct = (jnp.argmax(logits, -1) == micro["targets"]) * mask
    return jnp.sum(nll * mask), jnp.sum(correct), aux


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    skip_nonfinite: bool,
    segments: bool = True,
    trainable=None,
) -> Callable:
    """`train_step(state, batch) -> (state, metrics)` (module docstring); `trainable` is a
    bool tree shaped like the params (None: all train)."""

    def train_step(state, batch):
        params = state["params"]
        n_acc = batch["tokens"].shape[0]
        count = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        def objective(p, micro):
            if trainable is not None:
                p = jax.tree.map(lambda x, t: x if t else jax.lax.stop_gradient(x), p, trainable)
            nll, correct, aux = token_losses(graphdef, p, micro, segments)
            return nll / count + aux / n_acc, (nll, correct, aux)

        grad_fn = jax.grad(objective, has_aux=True)

        def accumulate(carry, micro):
            grads, nll, correct, aux = carry
            g, (n, c, a) = grad_fn(params, micro)
            return (jax.tree.map(jnp.add, grads, g), nll + n, correct + c, aux + a), None

        zero = jnp.zeros((), jnp.float32)
        init = (jax.tree.map(jnp.zeros_like, params), zero, zero, zero)
        (grads, nll, correct, aux), _ = jax.lax.scan(accumulate, init, batch)
        loss = nll / count + aux / n_acc
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "skipped": state["skipped"],
        }
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = {k: new[k] for k in ("params", "opt_state")}
            old = {k: state[k] for k in ("params", "opt_state")}
            keep = jax.tree.map(lambda n, o: jnp.where(finite, n, o), keep, old)
            new = {**new, **keep, "skipped": state["skipped"] + (~finite).astype(jnp.int32)}
        metrics = {
            "loss": loss,
            "aux_loss": aux / n_acc,
            "accuracy": correct / count,
            "grad_norm": grad_norm,
            "tokens": count,
        }
        return new, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, segments: bool = True) -> Callable:
    """`eval_step(params, batch) -> {"nll_sum", "correct", "count"}` over all micro-batches."""

    def eval_step(params, batch):
        def one(carry, micro):
            nll, correct, _ = token_losses(graphdef, params, micro, segments)
            return (carry[0] + nll, carry[1] + correct), None

        zero = jnp.zeros((), jnp.float32)
        (nll, correct), _ = jax.lax.scan(one, (zero, zero), batch)
        return {"nll_sum": nll, "correct": correct, "count": jnp.sum(batch["loss_mask"])}

    return eval_step
