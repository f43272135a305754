"""The registry is the one description of a layer family (issue 15): `ModelConfig`'s option
sections mirror the layer configs field for field and default for default, the model builds
its layers' configs from them (and validates them once, naming the flag), the family facts
agree with each other and with the layers, and a run directory of the older flat format
resumes. Builds configs and abstract layers only; compiles nothing."""

from __future__ import annotations

import dataclasses
import json

import pytest
from flax import nnx

from train.config import TrainConfig
from train.loop import _prepare_run_dir
from ttt_jax.layers import InPlaceMLPConfig, LaCTConfig, NPTMLPConfig, TTTConfig
from ttt_jax.models import (
    FAMILIES,
    InPlaceOptions,
    LaCTOptions,
    ModelConfig,
    NPTOptions,
    TTTOptions,
    preset,
)
from ttt_jax.models.config import OPTIONS, migrate_flat_fields

# Per options class: its layer config and the fields the model sets itself (not options).
MIRRORS = {
    TTTOptions: (TTTConfig, {"d_model", "num_heads", "inner", "precision"}),
    LaCTOptions: (
        LaCTConfig,
        {"d_model", "num_heads", "precision", "rope_theta", "attention_impl"},
    ),
    InPlaceOptions: (InPlaceMLPConfig, {"d_model", "d_ff", "precision"}),
    NPTOptions: (NPTMLPConfig, {"d_model", "d_ff", "precision", "d_mod"}),
}
# Options whose default means something the layer config spells differently (LaCTOptions).
OWN_DEFAULTS = {(LaCTOptions, "num_fw_heads")}


@pytest.mark.parametrize("options", list(MIRRORS), ids=lambda c: c.__name__)
def test_options_mirror_the_layer_config(options):
    config, set_by_model = MIRRORS[options]
    layer_fields = {f.name: f for f in dataclasses.fields(config)}
    option_fields = {f.name: f for f in dataclasses.fields(options)}
    # Every layer-config field is an option or set by the model: a field added to the layer
    # config without an option (or a decision) fails here.
    assert set(option_fields) | set_by_model == set(layer_fields)
    assert not set(option_fields) & set_by_model
    for name, field in option_fields.items():
        if (options, name) not in OWN_DEFAULTS:
            assert field.default == layer_fields[name].default, name


def test_one_default_for_checkpoint_group():
    assert TTTOptions().checkpoint_group == 4 == TTTConfig(d_model=8, num_heads=2).checkpoint_group
    assert ModelConfig().layer_config("ttt_linear") == TTTConfig(
        d_model=128, num_heads=4, precision=ModelConfig().mixed_precision
    )
    assert preset("tiny").ttt.checkpoint_group is None  # the preset's CPU choice, stated there
    assert preset("125m").layer_config("ttt_linear").checkpoint_group == 4


def test_lact_760m_is_the_layer_preset_one_option_away():
    model = preset("lact-760m")
    assert model.layer_config("lact") != LaCTConfig.preset("760m")
    scaled = dataclasses.replace(model, lact=dataclasses.replace(model.lact, learnable_scale=True))
    assert scaled.layer_config("lact") == LaCTConfig.preset("760m")


def test_bad_options_name_the_model_field():
    with pytest.raises(ValueError, match="ModelConfig.ttt.mini_batch_size must be a positive"):
        ModelConfig(ttt=TTTOptions(mini_batch_size=0))
    with pytest.raises(ValueError, match="ModelConfig.lact.num_fw_heads=5 must divide d_model"):
        ModelConfig(lact=LaCTOptions(num_fw_heads=5))  # validated though no block uses LaCT
    with pytest.raises(ValueError, match="ModelConfig.inplace: .*needs checkpoint_group"):
        ModelConfig(inplace=InPlaceOptions(remat_policy="full"))
    with pytest.raises(ValueError, match="ModelConfig.npt must be a NPTOptions, got 3"):
        ModelConfig(npt=3)


def test_family_facts_agree_with_each_other_and_the_layers():
    config = ModelConfig(d_model=32, num_heads=2, d_ff=64, lact=LaCTOptions(chunk_size=8))
    dense = dataclasses.replace(config, lact=dataclasses.replace(config.lact, rank=None))
    for name, family in FAMILIES.items():
        assert family.options is None or family.options in OPTIONS, name
        assert family.recurrent == (family.chunk_field is not None), name
        if family.recurrent:
            # A recurrent layer resets at documents exactly when it is given the segment ids.
            assert family.resets_at_segments == ("segment_ids" in family.inputs), name
        assert family.chunk(config.layer_config(name)) >= 1
        params = set()  # the parameters of the layer, with LaCT's low-rank and dense starts
        for c in (config.layer_config(name), dense.layer_config(name)):
            layer = nnx.eval_shape(lambda c=c, f=family: f.layer(c, rngs=nnx.Rngs(0)))
            params |= set(nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
        missing = [w for w in family.fast_weights if w not in params]
        assert not missing, (name, missing)


# The tiny preset's model in a config.json written before the layer options were nested.
OLD_TINY = {
    "vocab_size": 256, "d_model": 128, "num_layers": 4, "num_heads": 4, "d_ff": 384,
    "pattern": ["attention/swiglu", "ttt_linear/swiglu"], "tie_embeddings": True,
    "window": None, "rope_theta": 10000.0, "attention_impl": "auto", "ttt_mini_batch": 16,
    "ttt_base_lr": None, "ttt_backbone": "mamba", "ttt_unroll": 1, "lact_chunk": 2048,
    "lact_window": 2048, "lact_heads": None, "lact_rank": 32, "lact_muon": False,
    "lact_muon_dtype": None, "inplace_chunk": 256, "inplace_target": "embeddings",
    "npt_rank": 16, "precision": "fp32", "block_remat": "none", "checkpoint_group": None,
    "inner_remat_policy": None, "norm_eps": 1e-06, "embed_std": 0.02,
}  # fmt: skip


def test_flat_config_json_migrates_to_the_same_model():
    now = json.loads(json.dumps(dataclasses.asdict(preset("tiny"))))
    assert migrate_flat_fields(OLD_TINY) == now
    assert migrate_flat_fields(now) is now
    lact = migrate_flat_fields(dict(OLD_TINY, pattern=["lact/swiglu"], lact_heads=2, lact_chunk=8,
                                    checkpoint_group=4))  # fmt: skip
    assert not set(lact) & {"lact_heads", "checkpoint_group"}
    assert lact["lact"] == dict(dataclasses.asdict(LaCTOptions()), num_fw_heads=2, chunk_size=8,
                                checkpoint_group=4)  # fmt: skip
    # The sections of families the pattern does not use take their defaults.
    assert lact["inplace"] == dataclasses.asdict(InPlaceOptions())
    assert lact["ttt"] == dataclasses.asdict(TTTOptions())


def test_old_run_directory_resumes_and_another_model_is_refused(tmp_path):
    cfg = TrainConfig(run_dir=str(tmp_path))
    saved = dict(json.loads(cfg.to_json()), model=OLD_TINY)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert _prepare_run_dir(cfg) == str(tmp_path)
    saved["model"] = dict(OLD_TINY, ttt_mini_batch=8)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"another model \(fields differ: ttt\)"):
        _prepare_run_dir(cfg)
