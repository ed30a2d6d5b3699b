"""Signals and input leases of the command-line process (never installed inside ComfyUI, which owns its
process: there an Interrupt already stops a node through the progress hook).

* SIGTERM (what `timeout` and service managers send), SIGHUP (a closed terminal) and SIGQUIT become a
  `Terminated` exception in the main thread, like Ctrl-C's KeyboardInterrupt: the writers' cleanup runs
  (temp files removed, nothing placed) and the CLI exits 128 + the signal number. SIGKILL cannot be
  caught; the hidden temp file it leaves carries the pid, and the next run writing the same output
  removes it (`paths.remove_stale_temps`).
* SIGXFSZ (a file size limit) is ignored, so the write fails with EFBIG and the usual "could not write …;
  free disk space" error instead of a core dump that leaves the temp file.
* Inputs are memory-mapped; a file truncated while it is mapped kills the process with SIGBUS, which no
  Python code can catch. So each input file gets a read lease (Linux `F_SETLEASE`): another program
  that opens it for writing (a download rewriting it, `truncate`, `cp` over it) is held back, and we get
  SIGIO, which becomes `InputChanged` naming the file: the run stops with exit 2 before the file can
  shrink under us, then the lease goes and the other program proceeds. Where no lease can be taken
  (another user's file, a network file system, not Linux), sources compare the file size before each read.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

CAUGHT = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n))
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", None)
_F_GETLEASE = getattr(fcntl, "F_GETLEASE", None)
_SIGIO = getattr(signal, "SIGIO", None)


class Terminated(BaseException):
    """A terminating signal arrived (a BaseException, like KeyboardInterrupt: `except Exception` blocks
    must not swallow it)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class InputChanged(BaseException):
    """Another program opened an input for writing while it was being read."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(path)


_leases: dict[int, str] = {}  # fd -> path of the input it holds a read lease on
_active = False
_stopping = False


def _on_terminate(signum, frame) -> None:
    global _stopping
    if _stopping:  # the cleanup of the first signal is running: let it finish
        return
    _stopping = True
    raise Terminated(signum)


def _on_lease_break(signum, frame) -> None:
    global _stopping
    broken = [path for fd, path in list(_leases.items()) if _lease_type(fd) == getattr(fcntl, "F_UNLCK", 2)]
    if broken and not _stopping:
        _stopping = True
        raise InputChanged(broken[0])


def _lease_type(fd: int) -> int | None:
    try:
        return fcntl.fcntl(fd, _F_GETLEASE)
    except OSError:
        return None


def hold_read_lease(fd: int, path: str | os.PathLike) -> bool:
    """Take a read lease on an input opened read-only (CLI only); False where none can be had."""
    if not _active or _F_SETLEASE is None:
        return False
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # EAGAIN: someone has it open for writing; EACCES: not our file; EINVAL: no leases here
        return False
    _leases[fd] = str(path)
    return True


def release_lease(fd: int) -> None:
    if _leases.pop(fd, None) is not None:
        try:
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        except OSError:
            pass


@contextmanager
def cli_signals() -> Iterator[None]:
    """Install the CLI's handlers for the block (main thread only; restored afterwards, so a test calling
    the CLI in-process gets its own handlers back)."""
    global _active, _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for sig in CAUGHT:
            previous[sig] = signal.signal(sig, _on_terminate)
        if _SIGIO is not None and _F_SETLEASE is not None:
            previous[_SIGIO] = signal.signal(_SIGIO, _on_lease_break)
        if hasattr(signal, "SIGXFSZ"):
            previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _active, _stopping = True, False
        yield
    finally:
        _active = False
        for fd in list(_leases):  # SIGIO goes back to its default (terminate): no lease may outlive the handler
            release_lease(fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stopping = False
