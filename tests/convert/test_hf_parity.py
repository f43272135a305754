"""Hugging Face checkpoints against the real client (issue 19 part 2): tiny random Llama,
Mistral, Qwen2 and Qwen3 models built with `transformers` and saved with `save_pretrained`
(nothing is downloaded) import with logits equal to the torch model's in fp32 (<= 1e-4
relative, SPEC 5's layer tolerance) and the same 32 greedy tokens as `model.generate`, and
export back to the same tensors.

The four cases cover between them: grouped-query heads (all), llama3 RoPE scaling, q/k/v/o
biases and a sharded checkpoint with an index (llama), a sliding window shorter than the
sequence and tied embeddings (mistral), Qwen2's q/k/v biases (qwen2), Qwen3's q/k RMSNorm
with an explicit head_dim unequal to d_model / heads and tied embeddings (qwen3). Norm scales
and biases are randomised (transformers initialises them to 1 and 0, which would hide a
misplaced one).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ttt_jax.convert import config_from_hf, export_pretrained, load_pretrained  # noqa: E402
from ttt_jax.models import LM  # noqa: E402
from ttt_jax.models.generate import generate  # noqa: E402
from ttt_jax.testing import LAYER_TOL, rel_err  # noqa: E402

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=256,
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    # Wavelengths of head_dim 16 run from 6 to ~2e4 tokens: with 16 here most are scaled
    # and some interpolated, so every branch of the scaling is exercised.
    original_max_position_embeddings=16,
)
CASES = {
    "llama": dict(tie_word_embeddings=False, attention_bias=True, rope_parameters=LLAMA3),
    "mistral": dict(tie_word_embeddings=True, sliding_window=5),
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(tie_word_embeddings=True, head_dim=32),
}
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
PROMPT, NEW = 8, 32


@pytest.fixture(scope="module", params=sorted(CASES))
def arch(request, tmp_path_factory):
    """One tiny random model per architecture, saved and imported (once per module)."""
    name = request.param
    config_cls, model_cls = (getattr(transformers, c) for c in CLASSES[name])
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **CASES[name])).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(name)
    # llama: ~50 KB shards, so the 2-layer model is split over several files and an index.
    shard = "50KB" if name == "llama" else "5GB"
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
    config, params = load_pretrained(path, precision="fp32")
    lm = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))  # abstract: no init to pay
    nnx.update(lm, params)
    tokens = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, 16))
    return dict(name=name, hf=model, path=path, config=config, params=params, lm=lm, tokens=tokens)


def test_logits_and_greedy_generation_match_transformers(arch):
    if arch["name"] == "llama":
        assert (arch["path"] / "model.safetensors.index.json").exists()
        assert len(list(arch["path"].glob("model-*.safetensors"))) > 1
    tokens = arch["tokens"]
    with torch.no_grad():
        want = arch["hf"](torch.tensor(tokens)).logits.numpy()
    graphdef, state = nnx.split(arch["lm"])
    got = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0])(state, jnp.asarray(tokens))
    assert rel_err(got, want) <= LAYER_TOL

    prompt = tokens[:, :PROMPT]
    with torch.no_grad():
        want = arch["hf"].generate(
            torch.tensor(prompt), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
        )
    got = generate(arch["lm"], prompt, NEW)
    np.testing.assert_array_equal(np.asarray(got), want[:, PROMPT:].numpy())


def _tensors(path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safetensors.safe_open(file, framework="numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_export_round_trip_is_exact(arch, tmp_path):
    export_pretrained(arch["config"], arch["params"], tmp_path, max_shard_size=30_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    want, got = _tensors(arch["path"]), _tensors(tmp_path)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert config_from_hf(tmp_path, precision="fp32") == arch["config"]
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == arch["name"]
    # transformers reads the export as the same model.
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.tensor(arch["tokens"])
    with torch.no_grad():
        np.testing.assert_array_equal(
            again(tokens).logits.numpy(), arch["hf"](tokens).logits.numpy()
        )
