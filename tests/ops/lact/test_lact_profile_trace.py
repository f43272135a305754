"""The trace and HLO parsing of `benchmarks/profile_lact.py` (issue 18): on a real CPU trace
(host events only: no device time, no crash) and on a trace laid out as a GPU's (a device
process with a CUDA stream line, an `XLA Ops` line repeating it, a host process), against a
small optimized-HLO text with a cuBLAS GEMM and a loop fusion."""

from __future__ import annotations

import gzip
import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest

from tests._train_helpers import ROOT


@pytest.fixture(scope="module")
def prof():
    spec = importlib.util.spec_from_file_location(
        "profile_lact", ROOT / "benchmarks" / "profile_lact.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HLO = """HloModule jit_f, entry_computation_layout={(bf16[4,16]{1,0}, bf16[16,8]{1,0})->f32[4,8]{1,0}}

%fused_multiply (param_0: f32[4,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %multiply.1 = f32[4,8]{1,0} multiply(%param_0, %param_0)
}

ENTRY %main.5 (a: bf16[4,16], b: bf16[16,8]) -> f32[4,8] {
  %a = bf16[4,16]{1,0} parameter(0)
  %b = bf16[16,8]{1,0} parameter(1)
  %custom-call.3 = (f32[4,8]{1,0}, s8[64]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]},"precision_config":{"operand_precision":["DEFAULT","DEFAULT"]}}}
  %get-tuple-element.1 = f32[4,8]{1,0} get-tuple-element(%custom-call.3), index=0
  ROOT %loop_multiply_fusion.2 = f32[4,8]{1,0} fusion(%get-tuple-element.1), kind=kLoop, calls=%fused_multiply
}
"""


def _meta(pid, tid, what, name):
    return dict(ph="M", pid=pid, tid=tid, name=what, args=dict(name=name))


def _x(pid, tid, ts, dur, name, **args):
    return dict(ph="X", pid=pid, tid=tid, ts=ts, dur=dur, name=name, args=args)


def gpu_like_trace():
    meta, x = _meta, _x
    return dict(
        traceEvents=[
            meta(1, None, "process_name", "/device:GPU:0"),
            meta(1, 7, "thread_name", "Stream #7(Compute)"),
            meta(1, 9, "thread_name", "XLA Ops"),
            meta(2, None, "process_name", "/host:CPU"),
            x(1, 7, 0.0, 30.0, "sm90_xmma_gemm_bf16bf16_bf16f32_f32", hlo_op="custom-call.3"),
            x(1, 7, 40.0, 10.0, "loop_multiply_fusion_2"),
            x(1, 7, 60.0, 5.0, "input_transpose_fusion"),
            x(1, 9, 0.0, 65.0, "custom-call.3"),  # the summary line: never counted
            x(2, 1, 0.0, 500.0, "PjitFunction(f)"),
        ]
    )


def test_hlo_parse_finds_the_gemm_and_its_flops(prof):
    hlo = prof.parse_hlo(HLO)
    gemm = hlo["instrs"]["custom-call.3"]
    assert gemm["flops"] == 2 * 4 * 8 * 16 and gemm["dot"] == "bf16 x bf16 -> f32 DEFAULT"
    assert prof.hlo_dot_summary(hlo) == {"bf16 x bf16 -> f32 DEFAULT": 1}
    assert prof.instr_class(hlo["instrs"]["loop_multiply_fusion.2"], hlo) == ("elementwise", None)


def test_gpu_like_trace_is_summed_per_class_from_the_stream_line(prof, tmp_path):
    run = tmp_path / "plugins" / "profile" / "2026_12_07"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump(gpu_like_trace(), f)
    events, lines = prof.kernel_events(prof.load_trace(str(tmp_path)))
    assert lines == "streams" and len(events) == 3
    summary = prof.summarise(events, prof.parse_hlo(HLO), calls=2)
    ms = summary["class_ms"]
    assert ms["gemm"] == pytest.approx(0.015) and ms["elementwise"] == pytest.approx(0.005)
    assert ms["copy/transpose"] == pytest.approx(0.0025)
    assert summary["named_events"] == 2 and summary["span_ms"] == pytest.approx(0.0325)
    assert summary["gemm_tflops_named"] == pytest.approx(1024 / 2 / 15e-6 / 1e12)


def test_a_cpu_trace_has_no_device_events(prof, tmp_path):
    f = jax.jit(lambda a: jnp.sum(a @ a))
    a = jnp.ones((64, 64))
    f(a).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        f(a).block_until_ready()
    trace = prof.load_trace(str(tmp_path))
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])  # host events are there
    events, lines = prof.kernel_events(trace)
    assert events == [] and lines == "none"
    summary = prof.summarise(events, prof.parse_hlo(f.lower(a).compile().as_text()), calls=1)
    assert summary["busy_ms"] == 0.0 and summary["gemm_tflops_named"] is None
