"""The memory report (issue 6, SPEC 4): forward peak, backward peak (fwd+bwd) and, for models,
the training step's peak, with argument / output / temp bytes that account exactly for what
the programs take and return; JSON and table output; the command line; the fast CPU compile
options leave the numbers as they are.
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tests.memory_helpers import small_model
from ttt_jax.memory import (
    LayerSpec,
    ModelWorkload,
    Remat,
    compiled_memory,
    layer_report,
    measured_memory,
    workload_report,
)
from ttt_jax.memory.__main__ import main
from ttt_jax.memory.analysis import FAST_CPU_OPTIONS, CompiledMemory, tree_bytes
from ttt_jax.memory.workload import abstract_split
from ttt_jax.models import LM

B, T = 2, 256
SPEC = dict(seq=T, batch=B, d_model=64, heads=4, chunk=64, d_ff=128)


@functools.cache
def report_of(spec: LayerSpec):
    return layer_report(spec)


@pytest.mark.parametrize("layer", ["ttt_linear", "ttt_mlp", "lact", "inplace_ttt", "npt"])
def test_layer_report_accounts_for_every_byte(layer):
    spec = LayerSpec(layer=layer, **SPEC)
    report = report_of(spec)
    params = report.state_bytes
    x = B * T * 64 * 2  # bf16 input (the compute dtype)
    assert params > 0
    assert report.forward.argument == params + x
    assert report.forward.output == x  # y in the compute dtype
    # Loss (fp32 scalar), the parameters' fp32 gradients and x's bf16 gradient, plus the
    # output tuple's table of 8-byte buffer pointers.
    assert report.fwd_bwd.argument == params + x
    n_out = 2 + len(jax.tree.leaves(spec.workload().programs(B, T)["fwd_bwd"].args[0]))
    assert 4 + params + x <= report.fwd_bwd.output <= 4 + params + x + 8 * n_out
    assert report.forward_peak == report.forward.peak
    assert report.backward_peak == report.fwd_bwd.peak > report.forward.peak
    assert report.fwd_bwd.temp > report.forward.temp > 0
    as_json = json.loads(report.to_json())
    assert as_json["forward_peak"] == report.forward.peak
    assert as_json["backward_peak"] == report.fwd_bwd.peak
    assert as_json["compiled"]["fwd_bwd"]["temp"] == report.fwd_bwd.temp
    assert as_json["measured"] == {}
    table = report.table()
    assert "peak (compiled)" in table and "fwd+bwd" in table and f"T={T}" in table


def test_scan_remat_lowers_the_backward_peak_not_the_forward():
    full = report_of(LayerSpec(layer="ttt_linear", checkpoint_group=None, **SPEC))
    group = report_of(LayerSpec(layer="ttt_linear", **SPEC))  # the layer's default group, 4
    assert group.title == report_of(LayerSpec(layer="ttt_linear", checkpoint_group=4, **SPEC)).title
    assert group.forward.peak == full.forward.peak
    assert group.backward_peak < full.backward_peak


def test_layer_spec_rejects_bad_input():
    with pytest.raises(ValueError, match="ttt_linear, ttt_mlp, lact, inplace_ttt, npt"):
        LayerSpec(layer="lstm")
    with pytest.raises(ValueError, match="applies to lact, inplace_ttt, not layer='ttt_mlp'"):
        LayerSpec(layer="ttt_mlp", backward="custom")
    with pytest.raises(ValueError, match="seq=0 must be positive"):
        LayerSpec(seq=0)
    with pytest.raises(ValueError, match="has no scan"):
        LayerSpec(layer="npt", checkpoint_group=4).workload()


def test_model_report_has_the_training_step_with_params_and_optimizer_state():
    workload = ModelWorkload(small_model(checkpoint_group=4))
    report = workload_report(workload, B, 64)
    assert list(report.compiled) == ["forward", "fwd_bwd", "train_step"]
    _, params, rest = abstract_split(lambda: LM(workload.config, rngs=nnx.Rngs(0)))
    p = tree_bytes(params)
    opt = tree_bytes(jax.eval_shape(workload.optimizer.init, params))
    assert report.state_bytes == p + opt
    assert 2 * p <= opt <= 2 * p + 64  # AdamW: two fp32 moments and a step count
    tokens = B * 64 * 4
    step = report.compiled["train_step"]
    assert step.argument == p + opt + tokens + tree_bytes(rest)
    assert step.alias == p + opt  # parameters and optimizer state donated and updated in place
    assert report.backward_peak == step.peak > report.fwd_bwd.peak - p
    assert report.forward.output == 4


def test_fast_cpu_options_keep_the_numbers():
    if jax.default_backend() != "cpu":
        pytest.skip("the fast options are CPU-only")
    cases = [
        LayerSpec(layer="ttt_linear", **SPEC).workload().programs(B, T)["fwd_bwd"],
        ModelWorkload(small_model())
        .with_remat(Remat(block_remat="full"))
        .programs(B, 64)["train_step"],
    ]
    # XLA's own defaults of the three options, given per compile: the suite itself may run with
    # the fast ones in XLA_FLAGS (tests/conftest.py), and per-compile options override those.
    defaults = {
        "xla_backend_optimization_level": 3,
        "xla_cpu_use_fusion_emitters": True,
        "xla_llvm_disable_expensive_passes": False,
    }
    assert defaults.keys() == FAST_CPU_OPTIONS.keys()
    for program in cases:
        fast = compiled_memory(program.fn, *program.args, donate_argnums=program.donate_argnums)
        jitted = jax.jit(program.fn, donate_argnums=tuple(program.donate_argnums))
        slow = CompiledMemory.of(jitted.lower(*program.args).compile(compiler_options=defaults))
        assert (fast.argument, fast.output, fast.alias) == (slow.argument, slow.output, slow.alias)
        # Measured: equal, or 192 bytes apart (the alignment of one small buffer).
        assert abs(fast.temp - slow.temp) <= 4096, (fast.temp, slow.temp)


def test_measure_on_cpu_returns_no_statistics_but_the_outputs():
    if jax.default_backend() != "cpu":
        pytest.skip("on a GPU the allocator keeps statistics")
    memory, out = measured_memory(lambda x: 2 * x, jnp.ones(3))
    assert memory is None and out.tolist() == [2.0, 2.0, 2.0]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_measure_on_gpu_reads_the_allocator():
    report = layer_report(LayerSpec(layer="ttt_linear", **SPEC), measure=True)
    for name in ("forward", "fwd_bwd"):
        m = report.measured[name]
        assert 0 < m.steady <= m.peak and 0 < m.efficiency <= 1
    assert report.measured["fwd_bwd"].peak >= report.fwd_bwd.argument


def run_cli(monkeypatch, capsys, *argv) -> str:
    monkeypatch.setattr(sys, "argv", ["python -m ttt_jax.memory", *argv])
    main()
    return capsys.readouterr().out


def test_cli_report_layer_and_model(monkeypatch, capsys):
    out = run_cli(
        monkeypatch, capsys, "report", "--layer", "npt", "--seq", "128", "--d-model", "64"
    )
    assert "fwd+bwd" in out and "NPTMLPConfig" in out
    out = run_cli(
        monkeypatch, capsys, "report", "--model", "tiny", "--baseline", "--seq", "64", "--json"
    )
    report = json.loads(out)
    assert "pattern=[attention/swiglu]" in report["title"]
    assert " fp32 " in report["title"]  # the preset's own precision unless --precision
    assert report["backward_peak"] == report["compiled"]["train_step"]["peak"]
    assert report["seq"] == 64 and report["backend"].startswith(jax.default_backend())


def test_cli_flags_make_the_same_report_as_the_spec(monkeypatch, capsys):
    spec = LayerSpec(layer="lact", checkpoint_group=None, **SPEC)
    flags = ["--seq", "256", "--batch", "2", "--d-model", "64", "--heads", "4", "--chunk", "64"]
    out = run_cli(
        monkeypatch,
        capsys,
        "report",
        "--layer",
        "lact",
        *flags,
        "--checkpoint-group",
        "none",
        "--json",
    )
    report = json.loads(out)
    expected = report_of(spec)
    assert report["title"] == expected.title
    assert (
        "LaCTConfig(d_model=64, num_heads=4, num_fw_heads=4, chunk_size=64, rank=16"
        in (report["title"])
    )
    assert "checkpoint_group=None" in report["title"]
    for name in ("forward", "fwd_bwd"):
        assert report["compiled"][name] == expected.compiled[name].to_dict()


def test_cli_rejects_bad_flags(capsys):
    # The project's own errors: one line on stderr, exit 2 (more cases: tests/test_cli_errors.py).
    assert main(["report", "--baseline"]) == 2
    assert "need --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--checkpoint-group", "four"])
    assert "'four' is not a positive int, 'none' or 'default'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--model", "tiny", "--block-remat", "some"])
    assert "valid: none, full, dots" in capsys.readouterr().err


def test_report_dtypes_follow_the_precision():
    fp32 = layer_report(LayerSpec(layer="npt", precision="fp32", **SPEC))
    bf16 = layer_report(LayerSpec(layer="npt", precision="bf16", **SPEC))
    x16 = B * T * 64 * jnp.dtype(jnp.bfloat16).itemsize
    assert fp32.forward.argument - bf16.forward.argument == x16
