"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 and Qwen3 (issue 19).

    config = config_from_hf(path_or_dict, **overrides)          # -> ModelConfig
    config, params = load_pretrained(path, *, shardings=None, dtype=None, **overrides)
    export_pretrained(config, params, path, *, model_type=None, dtype=None, max_shard_size=None)

`path` is a checkpoint directory (`config.json` and `model.safetensors`, or shards with
`model.safetensors.index.json`). `overrides` are `ModelConfig` fields set on top of what
`config.json` says (e.g. `precision="fp32"`, `block_remat="full"`); the fields the checkpoint
decides cannot be overridden (`hf_config.ARCHITECTURE_FIELDS`). What each architecture maps to
is `hf_config`'s docstring; where each tensor goes, `layout`'s.

`params` is the pure dict of the LM's `nnx.Param`s, the layout `train.state` trains
(`nnx.to_pure_dict(nnx.state(LM(config, rngs=...), nnx.Param))`): every block parameter sits
under `params["groups"]["blocks"][i]` stacked on a leading `layers` axis (the pattern of an
imported model is `("attention/swiglu",)`, so layer l is row l of block 0). Put it into a model
with `nnx.update(lm, params)`, or merge it with the graphdef of `nnx.split(lm, nnx.Param)`.

`shardings`: None (the default device), one `jax.sharding.Sharding` for every array, or a pure
dict of shardings with the structure of `params` (what `train.state.make_setup` computes as
`state_shardings["params"]`); each tensor is read alone and placed straight into its sharding,
so a model larger than one device loads under FSDP.

The `safetensors` package (the `hf` extra) is imported only when a checkpoint is read or
written; `transformers` is never imported here (the parity tests use it).
"""

# isort: skip_file

# --- config.json <-> ModelConfig
from ttt_jax.convert.hf_config import MODEL_TYPES, config_from_hf, config_to_hf

# --- tensors in and out
from ttt_jax.convert.load import abstract_params, export_pretrained, load_pretrained

__all__ = [
    "MODEL_TYPES",
    "config_from_hf",
    "config_to_hf",
    "abstract_params",
    "export_pretrained",
    "load_pretrained",
]
