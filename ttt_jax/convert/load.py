"""`load_pretrained` and `export_pretrained`: a checkpoint directory <-> the LM's parameters.

Loading reads one tensor at a time (`CheckpointReader`), changes it to the ttt-jax layout on the
host (`ttt_jax.convert.layout`), and puts it on the devices in its target sharding. A block
parameter is stacked over layers (`[repeats, ...]`): its stacked array is created in its
sharding (zeros), and each layer's row is placed in the row's sharding and written into it by
a donated in-place update, so the host holds one tensor and every device its shard of the
stacked array plus one row's shard, never the whole model: a model larger than one device
loads under FSDP.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, Sharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from ttt_jax.convert.hf_config import config_from_hf, config_to_hf
from ttt_jax.convert.layout import block_entries, ignorable, layer_name, model_entries
from ttt_jax.convert.tensors import CheckpointReader, write_tensors
from ttt_jax.models.config import ModelConfig
from ttt_jax.models.lm import LM


def abstract_params(config: ModelConfig) -> dict:
    """`ShapeDtypeStruct`s of the LM's parameters (a pure dict, nothing allocated)."""
    model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaf_paths(v, (*prefix, k))
    else:
        yield prefix


def _sharding_of(shardings, path) -> Sharding:
    if shardings is None:
        return SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, Sharding):
        return shardings
    try:
        sharding = _get(shardings, path)
    except (KeyError, IndexError, TypeError):
        raise ValueError(
            f"shardings has no entry for parameter {'/'.join(map(str, path))}: pass None, one "
            "Sharding, or a tree of Shardings with the structure of the params"
        ) from None
    if not isinstance(sharding, Sharding):
        raise ValueError(
            f"shardings/{'/'.join(map(str, path))} must be a jax.sharding.Sharding, got "
            f"{type(sharding).__name__}"
        )
    return sharding


def _row_sharding(sharding: Sharding, ndim: int) -> Sharding:
    """The sharding of one row `[...]` of an array `[repeats, ...]` laid out as `sharding`."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, P(*spec[1:]))
    return sharding


def _write_row(stacked: jax.Array, row: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, row.astype(stacked.dtype), index, 0)


# Donated: the stacked array is updated in place, not copied once per layer.
_write_row_donated = jax.jit(_write_row, donate_argnums=0)


def _zeros(shape, dtype, sharding: Sharding) -> jax.Array:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _convert(reader, name, entry, shape, dtype) -> np.ndarray:
    x = reader.get(name)
    try:
        y = entry.to_ours(x)
    except ValueError:
        y = None
    if y is None or y.shape != tuple(shape):
        raise ValueError(
            f"{reader.path}: tensor {name} has shape {tuple(x.shape)}, which does not give the "
            f"model's {'/'.join(map(str, entry.path))} of shape {tuple(shape)} (config.json "
            "and the tensors disagree)"
        )
    return np.asarray(y, dtype=dtype)


def load_pretrained(path, *, shardings=None, dtype=None, **overrides) -> tuple[ModelConfig, dict]:
    """A Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoint as a ttt-jax LM.

    Args:
      path: the checkpoint directory (`config.json`, `model.safetensors` or shards with
        `model.safetensors.index.json`).
      shardings: where the arrays go: None (the default device), one `jax.sharding.Sharding`
        for all, or a pure dict of them shaped like the params (`train.state` computes it).
      dtype: dtype of the loaded arrays (None: the model's parameter dtype, fp32).
      **overrides: `ModelConfig` fields the checkpoint does not decide (`config_from_hf`).

    Returns:
      `(config, params)`: the `ModelConfig` and the pure dict of the LM's parameters
      (`ttt_jax.convert` docstring).

    Raises:
      ValueError: an unsupported `config.json` field, a missing, unexpected or misshapen
        tensor (naming it), or bad `shardings`.
    """
    if "retrofit" in overrides:
        raise ValueError(
            "load_pretrained loads the pretrained model itself: retrofit it afterwards "
            "(ttt_jax.models.retrofit)"
        )
    config = config_from_hf(path, **overrides)
    abstract = abstract_params(config)
    period = len(abstract["groups"]["blocks"])
    params: dict = {}
    with CheckpointReader(path) as reader:
        used = set()
        for entry in model_entries(config):
            leaf = _get(abstract, entry.path)
            kind = leaf.dtype if dtype is None else dtype
            x = _convert(reader, entry.name, entry, leaf.shape, kind)
            _set(params, entry.path, jax.device_put(x, _sharding_of(shardings, entry.path)))
            used.add(entry.name)
        for position in range(period):
            for entry in block_entries(config):
                where = ("groups", "blocks", position, *entry.path)
                leaf = _get(abstract, where)
                kind = leaf.dtype if dtype is None else dtype
                sharding = _sharding_of(shardings, where)
                row_sharding = _row_sharding(sharding, len(leaf.shape))
                stacked = _zeros(leaf.shape, kind, sharding)
                for r in range(leaf.shape[0]):
                    name = layer_name(r * period + position, entry)
                    row = _convert(reader, name, entry, leaf.shape[1:], kind)
                    row = jax.device_put(row, row_sharding)
                    stacked = _write_row_donated(stacked, row, jnp.asarray(r, jnp.int32))
                    used.add(name)
                _set(params, where, stacked)
        extra = sorted(n for n in reader.names if n not in used and not ignorable(n, config))
    if extra:
        raise ValueError(
            f"{os.fspath(path)}: the checkpoint has tensors the model has no parameter for "
            f"({len(extra)}, e.g. {', '.join(extra[:3])}); config.json and the tensors disagree"
        )
    missing = [p for p in _leaf_paths(abstract) if not _has(params, p)]
    if missing:
        raise ValueError(f"parameters not filled from the checkpoint: {missing[:3]}")
    return config, params


def _has(tree, path) -> bool:
    try:
        _get(tree, path)
    except (KeyError, IndexError, TypeError):
        return False
    return True


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def export_pretrained(
    config: ModelConfig,
    params,
    path,
    *,
    model_type: str | None = None,
    dtype=None,
    max_shard_size: int | None = None,
) -> None:
    """Writes an attention-only LM as a Hugging Face checkpoint directory.

    Args:
      config: the model's config (pattern `("attention/swiglu",)`, no retrofit).
      params: its parameters: the pure dict `load_pretrained` returns, an `nnx.State` of
        `nnx.Param`s, or the `LM` itself.
      path: the directory to write (`config.json`, `model.safetensors` or shards and index).
      model_type: llama, mistral, qwen2 or qwen3 (None: the one the options imply,
        `hf_config.infer_model_type`).
      dtype: dtype of the written tensors (None: as the params, fp32).
      max_shard_size: bytes per shard; None writes one `model.safetensors`.

    Each tensor is gathered to the host on its own (a block parameter one layer at a time);
    the host holds at most one shard.
    """
    if isinstance(params, LM):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if not isinstance(params, dict):
        raise ValueError(f"params must be a pure dict, an nnx.State or an LM, got {type(params)}")
    some = _get(params, ("embed",))
    out_dtype = np.dtype(some.dtype if dtype is None else dtype)
    hf = config_to_hf(config, model_type, torch_dtype=str(out_dtype))
    period = len(params["groups"]["blocks"])

    def tensors():
        for entry in model_entries(config):
            yield entry.name, entry.to_hf(_host(_get(params, entry.path))).astype(out_dtype)
        for layer in range(config.num_layers):
            r, position = divmod(layer, period)
            for entry in block_entries(config):
                leaf = _get(params, ("groups", "blocks", position, *entry.path))
                yield layer_name(layer, entry), entry.to_hf(_host(leaf[r])).astype(out_dtype)

    path = os.fspath(path)
    write_tensors(path, tensors(), max_shard_bytes=max_shard_size)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
