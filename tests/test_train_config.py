"""Bad training input fails early with messages that name the field, the value and the fix:
unknown preset / mixer names list the valid ones; a mesh that does not divide the devices or
the batch names the axis and by how much; a missing data path fails before any compile. The
plain-argparse fallback (no tyro installed) takes the same flags as tyro."""

from __future__ import annotations

import json
import sys
import types

import pytest
from _train_helpers import MICRO_ARGS

from train.__main__ import main
from train.cli import parse
from train.config import MeshConfig, TrainConfig
from train.flags import parse_dataclass
from train.progress import PlainProgress
from train.sharding import check_batch, mesh_shape


def run_main(args, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:  # tyro's own parse errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_unknown_preset_and_mixer_list_valid_names(capsys):
    code, text = run_main(["--preset", "huge"], capsys)
    assert code == 2 and "unknown preset 'huge'" in text and "125m-attn" in text
    code, text = run_main(["--model.pattern", "mamba/swiglu"], capsys)
    assert code == 2 and "unknown mixer 'mamba'" in text and "ttt_linear" in text


def test_missing_data_path_fails_before_compiling(capsys, tmp_path):
    code, text = run_main(["--data.source", "text", "--data.path", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in text
    assert "compiled" not in text


def test_mesh_must_fill_the_devices(capsys, tmp_path):
    code, text = run_main(["--mesh.data", "3", "--run-dir", str(tmp_path)], capsys)
    assert code == 2 and "has 3 devices but there are 1 (more by 2)" in text
    with pytest.raises(ValueError, match="multiply to 3, which does not divide the 8 devices"):
        mesh_shape((-1, 3, 1), 8)
    assert mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)


def test_batch_must_split_over_accumulation_and_batch_axes():
    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2})
    assert check_batch(16, 2, mesh) == 8
    with pytest.raises(ValueError, match=r"micro-batch 6 .* data\*fsdp = 2\*2 = 4 \(remainder 2\)"):
        check_batch(12, 2, mesh)
    with pytest.raises(ValueError, match="not divisible by grad_accum=4"):
        TrainConfig(batch_size=6, grad_accum=4)


def test_config_validation_and_json():
    with pytest.raises(ValueError, match="TrainConfig.steps must be a positive int, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="mqar_vocab=512 exceeds ModelConfig.vocab_size=256"):
        from ttt_jax.data import DataConfig

        TrainConfig(data=DataConfig(source="mqar", mqar_vocab=512))
    saved = json.loads(TrainConfig().to_json())
    assert saved["model"]["pattern"] == ["attention/swiglu", "ttt_linear/swiglu"]
    assert saved["mesh"]["rules"][1] == ["embed", "fsdp"]


FLAGS = [
    *MICRO_ARGS, "--seq", "auto", "--run-dir", "x", "--fresh", "--mesh.rules", "embed", "fsdp",
    "layers", "None", "--model.pattern", "attention/swiglu", "lact/npt", "--model.window", "None",
    "--dist.coordinator=10.0.0.1:1234", "--nonfinite", "skip", "--checkpoint.keep-every", "5",
    "--model.ttt.base_lr", "0.5", "--optim.muon", "--checkpoint.no-async-save",
    "--data.no-segments",
]  # fmt: skip


def test_plain_flags_parse_like_tyro(monkeypatch, capsys):
    tyro = pytest.importorskip("tyro")
    default = TrainConfig()
    plain = parse_dataclass(TrainConfig, default, FLAGS)
    assert plain == tyro.cli(TrainConfig, default=default, args=FLAGS)
    assert plain.seq == "auto" and plain.mesh.rules == (("embed", "fsdp"), ("layers", None))
    with pytest.raises(ValueError, match=r"--seq: 'abc' is not a valid"):
        parse_dataclass(TrainConfig, default, ["--seq", "abc"])
    # Without tyro installed, `python -m train` takes the same flags through argparse.
    monkeypatch.setitem(sys.modules, "tyro", None)
    assert parse(["--preset", "125m", "--model.num-layers", "4"]).model.d_model == 768
    code, text = run_main(["--steps", "0"], capsys)
    assert code == 2 and "TrainConfig.steps must be a positive int, got 0" in text


def test_plain_progress_prints_lines(capsys):
    bar = PlainProgress(total=3, initial=0, disable=False, interval=3600.0)
    bar.set_postfix(loss="1.5000")
    bar.update(1)
    bar.update(2)  # the last step always prints
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("step 3/3 | loss 1.5000 |")
