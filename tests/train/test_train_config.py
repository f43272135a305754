"""Bad training input fails early with messages that name the field, the value and the fix:
unknown preset / mixer names list the valid ones; a mesh that does not divide the devices or
the batch names the axis and by how much; a missing data path fails before any compile. Every
flag's range is checked and a bad one is a single line on stderr naming the flag (exit 2, no
traceback), run-directory problems included. The plain-argparse fallback (no tyro installed)
takes the same flags as tyro."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from tests._train_helpers import DROP_CAPS, MICRO_ARGS, ROOT, env
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


# Every flag's range: a bad value is one line on stderr naming the flag, exit 2, no traceback.
BAD_FLAGS = [
    (["--seed", "-1"], "TrainConfig.seed must be an int in [0, 4294967296), got -1", "--seed"),
    (["--memory-budget-gb", "nan"], "memory_budget_gb must be a finite number > 0", "--memory-budget-gb"),
    (["--memory-budget-gb", "0"], "memory_budget_gb must be a finite number > 0", "--memory-budget-gb"),
    (["--peak-flops", "-1"], "peak_flops must be a finite number > 0", "--peak-flops"),
    (["--dist.num-processes", "0"], "num_processes must be a positive int", "--dist.num-processes"),
    (["--dist.process-id", "-1"], "process_id must be an int >= 0", "--dist.process-id"),
    (["--dist.num-processes", "2", "--dist.process-id", "2"], "process_id must be an int in [0, 2)",
     "--dist.process-id"),
    (["--dist.coordinator", "nohost"], "must be host:port", "--dist.coordinator"),
    (["--optim.b1", "1.0"], "OptimConfig.b1 must be in [0, 1), got 1.0", "--optim.b1"),
    (["--optim.b2", "nan"], "OptimConfig.b2 must be in [0, 1)", "--optim.b2"),
    (["--optim.warmup-steps", "-3"], "warmup_steps must be an int >= 0", "--optim.warmup-steps"),
    (["--optim.warmup-steps", "1.5"], "'1.5' is not a valid int", "--optim.warmup-steps"),
    (["--optim.lr", "inf"], "OptimConfig.lr must be a finite number > 0", "--optim.lr"),
    (["--checkpoint.keep-last", "0"], "keep_last must be a positive int", "--checkpoint.keep-last"),
    (["--log.eval-every", "0"], "eval_every must be a positive int", "--log.eval-every"),
    (["--run-dir", ""], "run_dir must be a non-empty path", "--run-dir"),
    (["--data.source", "npy", "--data.path", str(ROOT / "README.md"), "--data.eos-id", "999"],
     "DataConfig.eos_id=999 is outside the model's vocab", "--data.eos-id"),
    (["--data.eos-id", "-1"], "eos_id must be None or an int >= 0", "--data.eos-id"),
    (["--data.eos-id", "3"], "eos_id is only used by npy", "--data.eos-id"),
    (["--data.errors", "ignore"], "DataConfig.errors='ignore' is not one of strict, replace",
     "--data.errors"),
    (["--model.num-heads", "3"], "num_heads=3", "--model.num-heads"),
]  # fmt: skip


@pytest.mark.parametrize(
    "args,message,flag", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_every_bad_flag_is_one_line_naming_it(capsys, tmp_path, args, message, flag):
    # A tiny run in tmp_path should a flag ever be accepted (the case's own flags come last).
    safe = [*MICRO_ARGS, "--steps", "1", "--run-dir", str(tmp_path / "run")]
    try:
        code = main([*safe, *args])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert flag in lines[0]


def test_run_dir_problems_are_one_line_errors(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (a_file, "is a file, not a directory"),
        (a_file / "run", "cannot be used as a run directory (Not a directory)"),
        ("/proc/ttt-jax-run", "cannot be used as a run directory"),
    ]
    for run_dir, message in cases:
        code, text = run_main([*MICRO_ARGS, "--steps", "1", "--run-dir", str(run_dir)], capsys)
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        assert code == 2 and "Traceback" not in text, text[-2000:]
        assert len(errors) == 1 and "--run-dir" in errors[0] and message in errors[0], errors
        assert "compiled" not in text
    code, text = run_main([*MICRO_ARGS, "--fresh", "--run-dir", str(a_file)], capsys)
    assert code == 2 and "--fresh deletes only run directories" in text and a_file.exists()


def test_unwritable_run_dir_is_a_one_line_error(tmp_path):
    """A directory the user cannot write (what a read-only mount gives too). As root, under
    setpriv without the capability that bypasses file permissions."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    prefix = DROP_CAPS if os.geteuid() == 0 else []
    try:
        proc = subprocess.run(
            [*prefix, sys.executable, "-m", "train", *MICRO_ARGS, "--run-dir", str(locked / "run")],
            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    except OSError as err:
        pytest.skip(f"cannot drop root's permission override: {err}")
    finally:
        locked.chmod(0o755)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and "--run-dir" in errors[0] and "Permission denied" in errors[0]
