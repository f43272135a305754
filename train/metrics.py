"""Metric sinks (JSONL always, TensorBoard when tensorboardX imports), MFU and device memory."""

from __future__ import annotations

import json
import logging
import os

import jax

log = logging.getLogger("train")

# Dense bf16 peak FLOP/s per device, by a substring of `device.device_kind`.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device (None if unknown, e.g. a CPU: MFU is then not reported)."""
    if override:
        return override
    return next((v for k, v in PEAK_FLOPS.items() if k in device.device_kind), None)


def peak_memory_bytes() -> int | None:
    """Largest `peak_bytes_in_use` over this process's devices (None where not tracked)."""
    peaks = []
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def compiled_bytes(compiled) -> int | None:
    """Per-device bytes of a compiled step by XLA's account: arguments + outputs + temporaries,
    less what donation lets outputs reuse (None where the backend gives no analysis)."""
    try:
        ma = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if ma is None:
        return None
    return int(
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        + ma.temp_size_in_bytes
        - ma.alias_size_in_bytes
    )


class MetricsLog:
    """Appends `{"step": ..., ...}` records to `metrics.jsonl` and, if possible, TensorBoard.

    Only process 0 writes. On resume, records past the resumed step (written after the last
    checkpoint by the interrupted run) are dropped, so the file holds one record per step.
    """

    def __init__(self, run_dir: str, tensorboard: bool, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not importable: metrics go to %s only", self.path)
            else:
                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items() if v is not None}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _plain(v):
    try:
        return v.item() if hasattr(v, "item") else v
    except (TypeError, ValueError):
        return str(v)
