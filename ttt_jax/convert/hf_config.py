"""`config.json` of a Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoint <-> `ModelConfig`.

What each architecture is in ttt-jax terms: a stack of `attention/swiglu` blocks (pre-norm
RMSNorm, SwiGLU `down(silu(gate(x)) * up(x))` without biases), a final RMSNorm and a tied or
untied head, with these attention options (`AttentionOptions`):

| model_type | q/k/v bias | o bias | q/k RMSNorm | sliding window |
|---|---|---|---|---|
| llama   | attention_bias | attention_bias | - | - |
| mistral | - | - | - | sliding_window, every layer |
| qwen2   | always | - | - | sliding_window if use_sliding_window |
| qwen3   | attention_bias | attention_bias | always | sliding_window if use_sliding_window |

and grouped-query heads (`num_key_value_heads`) and `head_dim` in all four.

RoPE: `rope_theta` and `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5),
of type default or llama3. The window of ttt-jax is one for all layers; a checkpoint whose
layers mix sliding and full attention is refused.

Every field of `config.json` is known: it maps to the model, it is checked to have the value
ttt-jax implements (`hidden_act` silu, `mlp_bias` false, ...), or it does not change the
function the model computes (`IGNORED`: ids of special tokens, generation defaults, metadata).
Anything else (MoE fields, other RoPE types, quantization, ...) is a ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from ttt_jax.cli import read_json
from ttt_jax.models.config import ModelConfig
from ttt_jax.models.options import AttentionOptions

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
PATTERN = ("attention/swiglu",)

# ModelConfig fields a checkpoint decides (load_pretrained's overrides cannot set them).
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "d_ff",
    "pattern",
    "tie_embeddings",
    "window",
    "rope_theta",
    "norm_eps",
    "attention",
)

# Fields that do not change the function the model computes: metadata, special-token ids,
# cache and output switches, init ranges, generation defaults (transformers 4 wrote those into
# config.json too), and `max_position_embeddings` (ttt-jax has no position limit; llama3
# scaling uses its own `original_max_position_embeddings`).
IGNORED = frozenset(
    """
    _name_or_path architectures transformers_version torch_dtype dtype model_type
    id2label label2id problem_type return_dict output_attentions output_hidden_states
    output_scores return_dict_in_generate torchscript use_bfloat16 tf_legacy_loss
    pruned_heads chunk_size_feed_forward is_encoder_decoder is_decoder add_cross_attention
    cross_attention_hidden_size tie_encoder_decoder finetuning_task task_specific_params
    tokenizer_class prefix bos_token_id eos_token_id pad_token_id sep_token_id
    decoder_start_token_id use_cache initializer_range max_position_embeddings
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty
    suppress_tokens begin_suppress_tokens pretraining_tp
    """.split()
)
# `pretraining_tp`: transformers 4 split Llama's projections into that many slices and summed
# them, the same function up to rounding.

ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


def _read(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    if not isinstance(path_or_dict, str | os.PathLike):
        raise ValueError(
            f"path_or_dict must be a checkpoint directory, its config.json or a dict, got "
            f"{type(path_or_dict).__name__}"
        )
    path = os.fspath(path_or_dict)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    config = read_json(file, f"{file} does not exist (a Hugging Face checkpoint directory?)")
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def _int(hf: dict, key: str, default=None) -> int:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json: {key} must be a positive int, got {value!r}")
    return value


def _number(hf: dict, key: str, default=None) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"config.json: {key} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"config.json: {key} must be > 0, got {value!r}")
    return float(value)


def _flag(hf: dict, key: str, default: bool = False) -> bool:
    value = hf.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def _require(hf: dict, key: str, allowed, why: str) -> None:
    if key in hf and hf[key] not in allowed:
        raise ValueError(f"config.json: {key}={hf[key]!r} is not supported ({why})")


def _rope(hf: dict) -> dict[str, Any]:
    """`rope_theta` and the llama3 scaling options from either format."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"config.json: rope_parameters must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"config.json: rope_scaling must be an object or null, got {scaling!r}")
    theta = hf.get("rope_theta", (params or {}).get("rope_theta", 10000.0))
    if params is not None and "rope_theta" in params and "rope_theta" in hf:
        if params["rope_theta"] != hf["rope_theta"]:
            raise ValueError(
                f"config.json: rope_theta={hf['rope_theta']!r} and rope_parameters.rope_theta="
                f"{params['rope_theta']!r} disagree"
            )
    spec = scaling if scaling is not None else params or {}
    name = "rope_scaling" if scaling is not None else "rope_parameters"
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    known = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor"}
    known |= {"original_max_position_embeddings", "partial_rotary_factor"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"config.json: {name}.{unknown[0]} is not supported (unknown RoPE field)")
    if spec.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"config.json: {name}.partial_rotary_factor={spec['partial_rotary_factor']!r} is not "
            "supported (ttt-jax rotates the whole head)"
        )
    out: dict[str, Any] = {"rope_theta": _number({"rope_theta": theta}, "rope_theta")}
    if rope_type in (None, "default"):
        return out
    if rope_type != "llama3":
        raise ValueError(
            f"config.json: {name}.rope_type={rope_type!r} is not supported (default or llama3)"
        )
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key not in spec:
            raise ValueError(f"config.json: {name}.{key} is missing (llama3 RoPE scaling)")
    original = spec.get("original_max_position_embeddings")
    out["attention"] = dict(
        rope_scaling="llama3",
        rope_factor=_number(spec, "factor"),
        rope_low_freq_factor=_number(spec, "low_freq_factor"),
        rope_high_freq_factor=_number(spec, "high_freq_factor"),
        rope_original_max_positions=_int({"o": original}, "o")
        if original is not None
        else _int(hf, "max_position_embeddings"),
    )
    return out


def _window(hf: dict, model_type: str, num_layers: int) -> int | None:
    """The sliding window every layer uses (None: full attention); mixed layers are refused."""
    if model_type == "llama":
        return None
    window = hf.get("sliding_window")
    if window is not None:
        window = _int(hf, "sliding_window")
    if model_type == "mistral":
        types = hf.get("layer_types")
        kind = "sliding_attention" if window else "full_attention"
        if types is not None and set(types) != {kind}:
            raise ValueError(
                f"config.json: layer_types={types!r} mixes attention kinds; ttt-jax has one "
                "window for all layers"
            )
        return window
    if not _flag(hf, "use_sliding_window"):
        return None
    if window is None:
        raise ValueError("config.json: use_sliding_window is true but sliding_window is null")
    types = hf.get("layer_types")
    if types is None:
        first = hf.get("max_window_layers", 28)
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise ValueError(f"config.json: max_window_layers must be an int >= 0, got {first!r}")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers:
        raise ValueError(f"config.json: layer_types must list {num_layers} layers, got {types!r}")
    kinds = set(types)
    if not kinds <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"config.json: layer_types {sorted(kinds)} are not supported")
    if len(kinds) > 1:
        raise ValueError(
            "config.json: layer_types / max_window_layers mix sliding-window and full attention "
            "layers; ttt-jax has one window for all layers"
        )
    return window if kinds == {"sliding_attention"} else None


def config_from_hf(path_or_dict, **overrides) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face checkpoint (module docstring).

    Args:
      path_or_dict: the checkpoint directory, its `config.json`, or that file's dict.
      **overrides: `ModelConfig` fields the checkpoint does not decide (`precision`,
        `block_remat`, `attention_impl`, family options, `retrofit`, ...).

    Raises:
      ValueError: naming the `config.json` field ttt-jax does not implement, or an override of a
        field the checkpoint decides.
    """
    hf = _read(path_or_dict)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"config.json: model_type={model_type!r} is not supported (one of {MODEL_TYPES})"
        )
    known = set(IGNORED) | set(ROPE_KEYS) | set(_FIELDS[model_type])
    unknown = sorted(k for k in hf if k not in known)
    if unknown:
        raise ValueError(
            f"config.json: {unknown[0]} is not supported for model_type {model_type!r} (a field "
            f"whose meaning ttt-jax does not implement; all unknown: {', '.join(unknown)})"
        )
    _require(hf, "hidden_act", ("silu",), "the SwiGLU MLP uses silu")
    _require(hf, "mlp_bias", (False, None), "the SwiGLU MLP has no biases")
    _require(hf, "attention_dropout", (0, 0.0, None), "ttt-jax has no attention dropout")
    _require(hf, "is_encoder_decoder", (False, None), "a decoder-only LM")
    heads = _int(hf, "num_attention_heads")
    d_model = _int(hf, "hidden_size")
    num_layers = _int(hf, "num_hidden_layers")
    kv_heads = hf.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else _int(hf, "num_key_value_heads")
    head_dim = hf.get("head_dim")
    head_dim = d_model // heads if head_dim is None else _int(hf, "head_dim")
    bias = _flag(hf, "attention_bias")
    attention = dict(
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        qk_norm=model_type == "qwen3",
        qkv_bias=True if model_type == "qwen2" else bias,
        o_bias=False if model_type == "qwen2" else bias,
    )
    rope = _rope(hf)
    attention.update(rope.pop("attention", {}))
    bad = sorted(set(overrides) & set(ARCHITECTURE_FIELDS))
    if bad:
        raise ValueError(
            f"config_from_hf: {', '.join(bad)} come from the checkpoint's config.json and cannot "
            "be overridden"
        )
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"config_from_hf: {', '.join(unknown)} are not ModelConfig fields")
    return ModelConfig(
        vocab_size=_int(hf, "vocab_size"),
        d_model=d_model,
        num_layers=num_layers,
        num_heads=heads,
        d_ff=_int(hf, "intermediate_size"),
        pattern=PATTERN,
        tie_embeddings=_flag(hf, "tie_word_embeddings", False),
        window=_window(hf, model_type, num_layers),
        norm_eps=_number(hf, "rms_norm_eps", 1e-6),
        attention=AttentionOptions(**attention),
        **rope,
        **overrides,
    )


_COMMON = (
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
    "num_key_value_heads head_dim hidden_act rms_norm_eps tie_word_embeddings attention_dropout"
).split()
_FIELDS = {
    "llama": [*_COMMON, "attention_bias", "mlp_bias"],
    "mistral": [*_COMMON, "sliding_window", "layer_types"],
    "qwen2": [*_COMMON, "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"],
    "qwen3": [
        *_COMMON,
        "attention_bias",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        "layer_types",
    ],
}


def infer_model_type(config: ModelConfig) -> str:
    """The architecture whose `config.json` describes `config` (export): qwen3 for q/k norm,
    qwen2 for q/k/v biases without an output bias, mistral for a window, else llama."""
    a = config.attention
    if a.qk_norm:
        return "qwen3"
    if a.qkv_bias and not a.o_bias:
        return "qwen2"
    if config.window is not None:
        return "mistral"
    return "llama"


def config_to_hf(
    config: ModelConfig,
    model_type: str | None = None,
    *,
    torch_dtype: str = "float32",
    max_position_embeddings: int | None = None,
) -> dict:
    """The `config.json` dict of an attention-only `config` as `model_type` (None: inferred).

    Raises:
      ValueError: the config is not attention-only (`pattern`, `retrofit`), or `model_type`
        cannot express one of its options (naming it).
    """
    if tuple(config.pattern) != PATTERN or getattr(config, "retrofit", None) not in (
        None,
        type(config.retrofit)(),
    ):
        raise ValueError(
            f"export covers attention-only models: pattern must be {PATTERN} without a retrofit, "
            f"got pattern={config.pattern}"
        )
    model_type = infer_model_type(config) if model_type is None else model_type
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not one of {MODEL_TYPES}")
    a = config.attention
    head_dim = config.head_dim if a.head_dim is None else a.head_dim
    problems = []
    if a.qk_norm != (model_type == "qwen3"):
        problems.append(f"attention.qk_norm={a.qk_norm}")
    if model_type == "qwen2" and (not a.qkv_bias or a.o_bias):
        problems.append(f"attention.qkv_bias={a.qkv_bias}, o_bias={a.o_bias} (qwen2: true, false)")
    if model_type in ("llama", "qwen3") and a.qkv_bias != a.o_bias:
        problems.append(f"attention.qkv_bias={a.qkv_bias} != o_bias={a.o_bias}")
    if model_type == "mistral" and (a.qkv_bias or a.o_bias):
        problems.append("attention biases")
    if model_type == "llama" and config.window is not None:
        problems.append(f"window={config.window}")
    if problems:
        raise ValueError(f"model_type {model_type!r} cannot express {'; '.join(problems)}")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if a.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=a.rope_factor,
            low_freq_factor=a.rope_low_freq_factor,
            high_freq_factor=a.rope_high_freq_factor,
            original_max_position_embeddings=a.rope_original_max_positions,
        )
    if max_position_embeddings is None:
        max_position_embeddings = (
            int(a.rope_original_max_positions * a.rope_factor) if a.rope_scaling else 8192
        )
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": a.num_kv_heads or config.num_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "max_position_embeddings": max_position_embeddings,
        "torch_dtype": torch_dtype,
        # Both RoPE formats: transformers 4 reads the first two, 5 the third.
        "rope_theta": float(config.rope_theta),
        "rope_scaling": None if a.rope_scaling is None else dict(rope),
        "rope_parameters": rope,
    }
    if model_type in ("llama", "qwen3"):
        hf["attention_bias"] = a.qkv_bias
    if model_type == "llama":
        hf["mlp_bias"] = False
    if model_type == "mistral":
        hf["sliding_window"] = config.window
    if model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = config.window is not None
        hf["sliding_window"] = config.window
        hf["max_window_layers"] = 0 if config.window is not None else config.num_layers
    return hf
