"""Benchmark helpers: wall time and peak anonymous RSS (RssAnon: mmapped file pages don't count), for a
callable run in a fresh subprocess so every measurement starts from the interpreter's own baseline."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


def rss_anon_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Samples RssAnon of this process every `interval` seconds in a thread; `.peak` is the maximum."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak = rss_anon_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon_bytes())


@dataclass
class Measurement:
    name: str
    seconds: float
    peak_anon: int  # bytes, absolute
    baseline_anon: int  # bytes, RssAnon of the same process just before the work
    cpu_seconds: float = 0.0  # user + system CPU time of the work (all threads): steadier than wall on a loaded machine

    @property
    def extra_anon(self) -> int:
        return self.peak_anon - self.baseline_anon


def _child(fn, args, q) -> None:
    import gc

    gc.collect()
    base = rss_anon_bytes()
    cpu0 = os.times()
    with PeakSampler() as s:
        t0 = time.perf_counter()
        fn(*args)
        dt = time.perf_counter() - t0
    cpu1 = os.times()
    q.put((dt, s.peak, base, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)))


def measure(name: str, fn: Callable, *args) -> Measurement:
    """Run fn(*args) in a forked subprocess; return wall time and RssAnon peak/baseline of that process.
    `fn` must be importable (module-level) since the child is forked from this process."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"benchmark {name!r} failed in its subprocess (exit {p.exitcode})")
    dt, peak, base, cpu = q.get()
    return Measurement(name, dt, peak, base, cpu)


def drop_page_cache_hint(paths) -> None:
    """Warm the page cache for `paths` (cat them) and let the previous contender's writes reach the disk
    (sync), so every contender starts equal: inputs in RAM, no writeback of someone else's output
    competing for the disk and the CPU (that cost a later contender up to 1.5 s of a 4 s run)."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    if hasattr(os, "sync"):
        os.sync()


def table(rows: list[Measurement], baseline: str) -> str:
    base = next(r for r in rows if r.name == baseline)
    lines = [f"{'method':<34} {'wall s':>8} {'x ' + baseline[:14]:>18} {'peak RssAnon MB':>16} {'+ over start MB':>16} {'cpu s':>8}"]
    for r in rows:
        lines.append(
            f"{r.name:<34} {r.seconds:8.2f} {r.seconds / base.seconds:18.2f} {r.peak_anon / 2**20:16.0f} {r.extra_anon / 2**20:16.0f} {r.cpu_seconds:8.2f}"
        )
    return "\n".join(lines)


def env_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
