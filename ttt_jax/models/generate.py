"""Sampling from an LM: a prompt read once, then one token at a time through every layer's
decoding cache (`LM.prefill`, `LM.decode`).

    tokens = generate(model, prompt_ids, 32)                               # greedy
    tokens = generate(model, prompt_ids, 32, temperature=0.8, top_p=0.95, rng=jax.random.key(0))

Each step samples from the last position's logits: greedy (`temperature=0`) takes the argmax;
otherwise the logits are divided by the temperature and, with `top_p < 1`, restricted to the
smallest set of most likely tokens whose probabilities sum to at least `top_p` (nucleus
sampling) before sampling, with the key `fold_in(rng, step)`.

The prefill and the step are each one jitted function of the model's state (compiled once per
model structure and shapes, reused across calls): an attention-only model compiles twice for a
whole generation (its KV caches have fixed shapes); the streaming
caches of TTT and LaCT layers hold the unfinished chunk, whose length cycles through the chunk
size, and so compile once per length seen.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.models.lm import LM


def _check(model, prompt, max_new_tokens, temperature, top_p, rng, eos_id):
    if not isinstance(model, LM):
        raise ValueError(f"model must be a ttt_jax.models.LM, got {type(model).__name__}")
    if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise ValueError(
            f"prompt_ids must be [T] or [B, T] with B, T >= 1, got shape {tuple(prompt.shape)}"
        )
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_ids must be integer token ids, got dtype {prompt.dtype}")
    vocab = model.config.vocab_size
    if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab):
        raise ValueError(
            f"prompt_ids must lie in [0, {vocab}) (the model's vocab_size), got values in "
            f"[{prompt.min()}, {prompt.max()}]"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(temperature, int | float) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if temperature > 0 and rng is None:
        raise ValueError("rng (a jax.random key) is required to sample with temperature > 0")
    if eos_id is not None and (
        isinstance(eos_id, bool) or not isinstance(eos_id, int | np.integer) or not 0 <= eos_id
    ):
        raise ValueError(f"eos_id must be None or a token id in [0, {vocab}), got {eos_id!r}")
    if eos_id is not None and eos_id >= vocab:
        raise ValueError(f"eos_id must be None or a token id in [0, {vocab}), got {eos_id!r}")


def sample_logits(
    logits: jax.Array, key: jax.Array | None, *, temperature: float, top_p: float
) -> jax.Array:
    """One token per row from `logits: [B, V]`: `[B]` int32 (module docstring)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the tokens more likely than it sum to less than top_p: the smallest
        # prefix reaching top_p (the most likely token is always kept).
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _pick(logits, rng, step, temperature, top_p):
    key = None if temperature == 0 else jax.random.fold_in(rng, step)
    return sample_logits(logits[:, -1], key, temperature=temperature, top_p=top_p)


# Module-level jits with the model's graphdef static: repeated calls on the same model and
# shapes reuse the compiled prefill and step.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_length", "temperature", "top_p"))
def _prefill(graphdef, state, tokens, rng, *, max_length, temperature, top_p):
    logits, cache = nnx.merge(graphdef, state).prefill(tokens, max_length, last_only=True)
    return _pick(logits, rng, 0, temperature, top_p), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_p"))
def _step(graphdef, state, cache, token, rng, step, *, temperature, top_p):
    logits, cache = nnx.merge(graphdef, state).decode(token[:, None], cache, last_only=True)
    return _pick(logits, rng, step, temperature, top_p), cache


def generate(
    model: LM,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
) -> jax.Array:
    """Continues `prompt_ids` by `max_new_tokens` tokens.

    Args:
      model: the LM (its parameters as they stand; not changed).
      prompt_ids: `[T]` or `[B, T]` integer token ids, every row T long (no padding).
      max_new_tokens: N, tokens to generate per row.
      temperature: 0 for greedy decoding, else the sampling temperature.
      top_p: nucleus sampling's probability mass in (0, 1]; 1 keeps every token.
      rng: a `jax.random` key, required when `temperature > 0`.
      eos_id: a row that emits this token stops; its later positions repeat it. Generation
        ends early once every row has.

    Returns:
      `[N]` or `[B, N]` (as the prompt) int32 generated ids, the prompt not included.
    """
    prompt = np.asarray(prompt_ids)
    squeeze = prompt.ndim == 1
    if squeeze:
        prompt = prompt[None]
    _check(model, prompt, max_new_tokens, temperature, top_p, rng, eos_id)
    graphdef, state = nnx.split(model)
    knobs = dict(temperature=float(temperature), top_p=float(top_p))
    if knobs["temperature"] == 0:
        rng = None
    token, cache = _prefill(
        graphdef,
        state,
        jnp.asarray(prompt, jnp.int32),
        rng,
        max_length=prompt.shape[1] + max_new_tokens,
        **knobs,
    )
    out = [token]
    done = np.zeros(prompt.shape[0], bool)
    for i in range(1, max_new_tokens):
        if eos_id is not None:
            done |= np.asarray(token) == eos_id
            if done.all():
                break
        token, cache = _step(graphdef, state, cache, token, rng, jnp.asarray(i, jnp.int32), **knobs)
        if eos_id is not None:
            token = jnp.where(jnp.asarray(done), eos_id, token).astype(jnp.int32)
        out.append(token)
    tokens = jnp.stack(out, axis=1)
    if tokens.shape[1] < max_new_tokens:
        pad = jnp.full((tokens.shape[0], max_new_tokens - tokens.shape[1]), eos_id, jnp.int32)
        tokens = jnp.concatenate([tokens, pad], axis=1)
    return tokens[0] if squeeze else tokens
