"""Shared benchmark plumbing: timing jitted functions and reading their planned memory, rows
that record a failure instead of ending the run, per-config subprocesses for clean allocator
peaks, and the environment line every recorded result carries."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable


def environment() -> dict:
    import jax

    dev = jax.devices()[0]
    return dict(
        date=datetime.date.today().isoformat(),
        device=getattr(dev, "device_kind", str(dev)),
        backend=jax.default_backend(),
        jax=jax.__version__,
        jaxlib=__import__("jaxlib").__version__,
        flax=__import__("flax").__version__,
        python=platform.python_version(),
    )


def time_jitted(fn: Callable, *args, warmup: int = 2, iters: int = 10) -> dict:
    """Median and min wall time (ms) of `fn(*args)` (already jitted), each call synced."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return dict(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times))


def planned_gb(fn: Callable, *args) -> float:
    """The compiled program's planned memory for `fn(*args)` (`fn` jitted), GB: arguments +
    outputs + temporaries - aliased buffers (`ttt_jax.memory.CompiledMemory.peak`)."""
    from ttt_jax.memory import CompiledMemory

    return CompiledMemory.of(fn.lower(*args).compile()).peak / 1e9


def compile_and_time(fns: dict[str, Callable], args: tuple, iters: int) -> dict:
    """Per `mode: jitted fn` of `fns`: `{mode}_planned_gb` (`planned_gb`), `{mode}_compile_s`
    (the lowering and compile that reads it) and `{mode}_ms` (median of `iters` synced calls
    after one warm-up)."""
    row = {}
    for mode, fn in fns.items():
        t0 = time.perf_counter()
        row[f"{mode}_planned_gb"] = planned_gb(fn, *args)
        row[f"{mode}_compile_s"] = time.perf_counter() - t0
        row[f"{mode}_ms"] = time_jitted(fn, *args, warmup=1, iters=iters)["median_ms"]
    return row


def measure_modes(fns: dict[str, Callable], args: tuple, iters: int) -> dict:
    """Per `mode: jitted fn` of `fns`, in order: `{mode}_temp_gb` (the compiled program's
    temporaries), `{mode}_median_ms` and `{mode}_min_ms` (`time_jitted`), and `{mode}_peak_gb`
    (the allocator's peak so far; None where the backend keeps no statistics)."""
    out = {}
    for mode, fn in fns.items():
        planned = fn.lower(*args).compile().memory_analysis()
        out[f"{mode}_temp_gb"] = planned.temp_size_in_bytes / 1e9
        timing = time_jitted(fn, *args, iters=iters)
        out.update({f"{mode}_{k}": v for k, v in timing.items()})
        pb = peak_bytes()
        out[f"{mode}_peak_gb"] = None if pb is None else pb / 1e9
    return out


def guarded(fn: Callable, base: dict, *args, out: str | None = None, **kwargs) -> dict:
    """`{**base, **fn(*args, **kwargs), "wall_s": ...}`, or with `error` instead where `fn`
    raises (out of memory, compile errors: recorded, the run goes on); printed as one JSON line
    and, with `out`, appended to that file."""
    t0 = time.perf_counter()
    try:
        row = fn(*args, **kwargs)
    except Exception as e:
        traceback.print_exc()
        row = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    row = {**base, **row, "wall_s": round(time.perf_counter() - t0, 1)}
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")
    return row


def parse_shapes(texts: list[str]) -> list[tuple[int, ...]]:
    """`["8x32768x12x64", ...]` (`--shapes BxTxHxD`) -> `[(8, 32768, 12, 64), ...]`."""
    return [tuple(int(x) for x in s.split("x")) for s in texts]


def ttt_op_inputs(b: int, t: int, h: int, d: int, params: dict[str, tuple], seed: int = 0):
    """Random inputs of a TTT op: bf16 `q, k, v [B, T, H, D]`, fp32 `eta [B, T, H]` (0.01 x a
    sigmoid of normals) and fp32 `params` (name -> shape, in order): `ln_scale` 1 + 0.1 x
    normal, `ln_bias` 0.1 x normal, the fast weights' initial values 0.02 x normal.

    Returns:
      `((q, k, v, eta), params)`.
    """
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.PRNGKey(seed), 4 + len(params))
    q, k, v = (jax.random.normal(ks[i], (b, t, h, d), jnp.bfloat16) for i in range(3))
    offset_scale = {"ln_scale": (1.0, 0.1), "ln_bias": (0.0, 0.1)}
    values = {}
    for key, (name, shape) in zip(ks[4:], params.items(), strict=True):
        offset, scale = offset_scale.get(name, (0.0, 0.02))
        values[name] = offset + scale * jax.random.normal(key, shape)
    eta = 0.01 * jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
    return (q, k, v, eta), values


def peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if stats is None else int(stats["peak_bytes_in_use"])


def run_in_subprocess(
    script: str, config: dict, timeout: float = 600, xla_flags: str | None = None
) -> dict:
    """Runs `python script --one JSON` in a fresh process and returns the JSON it prints last.

    A fresh process per config is the only way to read that config's own allocator peak.
    Failures (out of memory included) come back as `{"error": ...}` instead of raising.
    `xla_flags` are appended to the child's `XLA_FLAGS`.
    """
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    try:
        proc = subprocess.run(
            [sys.executable, script, "--one", json.dumps(config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return dict(config, error=f"timeout after {timeout}s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(config, error=" | ".join(tail)[-300:])
    return json.loads(lines[-1])


def ran_as_child(one: str | None, run_one: Callable[[dict], dict]) -> bool:
    """The child side of `run_in_subprocess`: given `--one JSON`, prints `run_one(config)` as
    one JSON line and returns True (the caller returns); without it, False."""
    if not one:
        return False
    print(json.dumps(run_one(json.loads(one))))
    return True


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """`columns`: (key, header). Missing values print as '-'; floats with 2 decimals."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)
