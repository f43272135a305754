"""SIGTERM / SIGINT: finish the step, save, exit with `EXIT_INTERRUPTED`.

The handler only sets a flag (nothing unsafe runs inside a signal handler); the loop checks
it at every step boundary. The first signal restores the default handler, so a second Ctrl-C
kills the process at once.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_CONFIG = 2  # bad configuration or arguments (the CLI's usual code)
EXIT_NONFINITE = 3  # non-finite loss with nonfinite="stop"
EXIT_CHECKPOINT = 4  # checkpoints exist but none can be restored (nothing changed on disk)
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal, checkpoint saved, run again to resume


class StopFlag:
    """Set by SIGTERM / SIGINT once installed; `signum` tells which."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Puts back the handlers found by `install` (a caller's own, e.g. pytest's)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)

    @property
    def set(self) -> bool:
        return self.signum is not None
