"""Progress callbacks: the core reports (done, total); nodes turn that into ComfyUI's progress bar (which
also raises on Interrupt), the CLI into a bar on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

ProgressFn = Callable[[int, int], None]


def no_progress(done: int, total: int) -> None:
    return None


class TerminalProgress:
    """A light progress bar on stderr (redrawn at most ~10x a second, and only on a terminal unless forced)."""

    def __init__(self, desc: str, stream=None, force: bool = False):
        self.desc = desc
        self.stream = stream or sys.stderr
        self.enabled = force or getattr(self.stream, "isatty", lambda: False)()
        self._last = 0.0
        self._t0 = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        frac = done / total if total else 1.0
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        self.stream.write(f"\r{self.desc} [{bar}] {done}/{total} {now - self._t0:5.1f}s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
