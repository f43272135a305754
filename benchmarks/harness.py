"""Shared benchmark plumbing: timing jitted functions, per-config subprocesses for clean
allocator peaks, and the environment line every recorded result carries."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
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
