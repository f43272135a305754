"""The progress display: a tqdm bar, or plain lines where tqdm is not installed."""

from __future__ import annotations

import time


class PlainProgress:
    """Prints `step n/total | loss ... | tok_s ... | eta` every `interval` seconds and at the end.

    The subset of tqdm's interface the loop uses: `set_postfix`, `update`, `close`.
    """

    def __init__(self, total: int, initial: int, disable: bool, interval: float = 10.0):
        self.total, self.n, self.disable, self.interval = total, initial, disable, interval
        self.postfix: dict = {}
        self.start = self.last = time.perf_counter()
        self.first = initial

    def set_postfix(self, refresh: bool = True, **values) -> None:
        del refresh
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.disable or (now - self.last < self.interval and self.n < self.total):
            return
        self.last = now
        rate = (self.n - self.first) / max(now - self.start, 1e-9)
        eta = (self.total - self.n) / rate if rate else float("nan")
        fields = " | ".join(f"{k} {v}" for k, v in self.postfix.items())
        print(
            f"step {self.n}/{self.total} | {fields} | {rate:.2f} step/s | eta {eta:.0f}s",
            flush=True,
        )

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over the optimizer steps, or `PlainProgress` without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainProgress(total, initial, disable=not enabled)
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
    )
