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

    @property
    def extra_anon(self) -> int:
        return self.peak_anon - self.baseline_anon


def _child(fn, args, q) -> None:
    import gc

    gc.collect()
    base = rss_anon_bytes()
    with PeakSampler() as s:
        t0 = time.perf_counter()
        fn(*args)
        dt = time.perf_counter() - t0
    q.put((dt, s.peak, base))


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
    dt, peak, base = q.get()
    return Measurement(name, dt, peak, base)


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
    lines = [f"{'method':<34} {'wall s':>8} {'x ' + baseline[:14]:>18} {'peak RssAnon MB':>16} {'+ over start MB':>16}"]
    for r in rows:
        lines.append(
            f"{r.name:<34} {r.seconds:8.2f} {r.seconds / base.seconds:18.2f} {r.peak_anon / 2**20:16.0f} {r.extra_anon / 2**20:16.0f}"
        )
    return "\n".join(lines)


def env_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))


def _child_value(fn, args, q) -> None:
    q.put(fn(*args))


def in_child(fn: Callable, *args):
    """fn(*args) computed in a forked child and its (picklable) value returned: for work that starts
    torch's thread pools (a calibration), which must not start in the parent before it forks contenders."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_value, args=(fn, args, q))
    p.start()
    value = q.get()
    p.join()
    return value


def estimate_line(est: dict, m: Measurement) -> str:
    """The pre-run estimate (Estimate.to_dict()) next to what was measured, with the issue's targets:
    time within 2x, peak RAM (the RssAnon the work added) within 20%."""
    t_ratio = est["seconds"] / m.seconds if m.seconds else float("inf")
    ram = max(m.extra_anon, 1)
    r_err = est["peak_ram"] / ram - 1
    ok_t = "ok" if 0.5 <= t_ratio <= 2 else "OUT"
    ok_r = "ok" if abs(r_err) <= 0.2 else "OUT"
    return (f"estimate vs measured ({m.name}): time {est['seconds']:.2f} s vs {m.seconds:.2f} s = {t_ratio:.2f}x "
            f"[{ok_t}, target 0.5-2x]; peak RAM {est['peak_ram'] / 2**20:.0f} MB vs {ram / 2**20:.0f} MB added = "
            f"{r_err:+.0%} [{ok_r}, target ±20%]")
