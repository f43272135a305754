"""Hugging Face checkpoints without transformers (issue 19 part 1): `config.json` fields map to
the model or are refused by name, config round trips for every architecture, a bf16 checkpoint
reads (also through the raw-header path older `safetensors` need), a tensor that is missing,
unexpected or misshapen is a ValueError naming it, and a checkpoint loads straight into FSDP x
tensor shardings on 8 fake devices, equal to the one-device load."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("safetensors")

from tests._train_helpers import ROOT, env  # noqa: E402
from ttt_jax.convert import (  # noqa: E402
    MODEL_TYPES,
    config_from_hf,
    config_to_hf,
    export_pretrained,
    load_pretrained,
)
from ttt_jax.convert.tensors import CheckpointReader, _raw  # noqa: E402
from ttt_jax.models import LM, ModelConfig  # noqa: E402
from ttt_jax.models.options import AttentionOptions  # noqa: E402

TINY = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "torch_dtype": "bfloat16",
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
}


def test_llama_config_maps_to_the_model():
    config = config_from_hf(TINY, precision="fp32")
    assert config == ModelConfig(
        vocab_size=64,
        d_model=64,
        num_layers=2,
        num_heads=4,
        d_ff=96,
        pattern=("attention/swiglu",),
        tie_embeddings=False,
        rope_theta=500000.0,
        norm_eps=1e-5,
        precision="fp32",
        attention=AttentionOptions(num_kv_heads=2, head_dim=16),
    )
    # transformers 5's format: the RoPE base and scaling in `rope_parameters`.
    v5 = dict(TINY, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192})  # fmt: skip
    del v5["rope_theta"]
    a = config_from_hf(v5).attention
    assert (a.rope_scaling, a.rope_factor, a.rope_original_max_positions) == ("llama3", 32.0, 8192)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"num_experts": 8}, "num_experts"),
        ({"quantization_config": {"bits": 4}}, "quantization_config"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"rope_parameters": {"rope_theta": 5e5, "partial_rotary_factor": 0.5}}, "partial_rotary"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"sliding_window": 128}, "sliding_window"),  # llama has none
        ({"num_key_value_heads": 3}, "num_kv_heads"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
)
def test_unsupported_fields_are_refused_by_name(change, field):
    with pytest.raises(ValueError, match=field):
        config_from_hf(dict(TINY, **change))


def test_qwen_sliding_windows_all_or_nothing():
    qwen2 = dict(TINY, model_type="qwen2", use_sliding_window=True, sliding_window=64)
    assert config_from_hf(dict(qwen2, max_window_layers=0)).window == 64
    assert config_from_hf(dict(qwen2, use_sliding_window=False)).window is None
    with pytest.raises(ValueError, match="layer_types / max_window_layers mix"):
        config_from_hf(dict(qwen2, max_window_layers=1))
    mixed = dict(qwen2, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="mix sliding-window and full"):
        config_from_hf(mixed)
    with pytest.raises(ValueError, match="cannot be overridden"):
        config_from_hf(TINY, d_model=32)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_config_round_trips_for_every_architecture(model_type):
    options = {
        "llama": dict(qkv_bias=True, o_bias=True, rope_scaling="llama3"),
        "mistral": {},
        "qwen2": dict(qkv_bias=True),
        "qwen3": dict(qk_norm=True, head_dim=32),
    }[model_type]
    config = ModelConfig(
        vocab_size=64, d_model=64, num_layers=2, num_heads=4, d_ff=96,
        pattern=("attention/swiglu",), window=8 if model_type == "mistral" else None,
        attention=AttentionOptions(num_kv_heads=2, head_dim=options.pop("head_dim", 16), **options),
    )  # fmt: skip
    hf = json.loads(json.dumps(config_to_hf(config)))
    assert hf["model_type"] == model_type
    assert config_from_hf(hf) == config
    with pytest.raises(ValueError, match="attention-only"):
        config_to_hf(ModelConfig())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = config_from_hf(TINY, precision="fp32")
    lm = LM(config, rngs=nnx.Rngs(0))
    path = tmp_path_factory.mktemp("bf16")
    export_pretrained(config, lm, path, dtype=jnp.bfloat16)
    return config, nnx.to_pure_dict(nnx.state(lm, nnx.Param)), path


def test_bf16_checkpoint_reads_its_values(checkpoint):
    config, params, path = checkpoint
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded_config, loaded = load_pretrained(path, precision="fp32")
    assert loaded_config == config
    w = params["groups"]["blocks"][0]["mixer"]["W_q"]
    got = loaded["groups"]["blocks"][0]["mixer"]["W_q"]
    assert got.dtype == jnp.float32 and got.shape == w.shape
    np.testing.assert_array_equal(got, np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32)))
    with CheckpointReader(path) as reader:
        name = "model.layers.1.self_attn.k_proj.weight"
        direct = reader.get(name)
        assert direct.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(_raw(str(path / "model.safetensors"), name), direct)


def test_tensor_problems_name_the_tensor(checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, _, path = checkpoint
    tensors = load_file(path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())

    def attempt(new):
        save_file(new, tmp_path / "model.safetensors")
        return pytest.raises(ValueError, match=problem)

    problem = "no tensor 'model.layers.1.mlp.up_proj.weight'"
    with attempt({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}):
        load_pretrained(tmp_path)
    problem = "has tensors the model has no parameter for .*model.layers.0.mlp.up_proj.bias"
    with attempt(dict(tensors, **{"model.layers.0.mlp.up_proj.bias": np.zeros(96, np.float32)})):
        load_pretrained(tmp_path)
    problem = "model.layers.0.self_attn.o_proj.weight has shape \\(64, 32\\)"
    bad = dict(
        tensors, **{"model.layers.0.self_attn.o_proj.weight": np.zeros((64, 32), np.float32)}
    )
    with attempt(bad):
        load_pretrained(tmp_path)


def test_checkpoint_loads_into_fsdp_shardings():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "convert" / "_sharded_load.py"), json.dumps(TINY)],
        cwd=ROOT,
        env=env(devices=8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["equal"] and out["in_place"]
    # W_q [layers, d, H, Dh]: d over fsdp (4), heads over tensor (2): a 1/8 block per device.
    assert out["w_q_spec"] == ["None", "fsdp", "tensor", "None"]
    assert out["w_q_shape"] == [2, 64, 4, 16] and out["w_q_shard"] == [2, 16, 2, 16]
    assert out["embed_spec"] == ["tensor", "fsdp"]
    assert out["split_leaves"] == out["leaves"]  # every parameter is split over some axis
