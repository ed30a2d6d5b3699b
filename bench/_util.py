"""Benchmark helpers: wall time and peak anonymous RSS (RssAnon: mmapped file pages don't count), for a
callable run in a fresh subprocess so every measurement starts from the interpreter's own baseline."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


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
    cpu: float = 0.0  # user + sys seconds of the child, all threads (set by run_contender / measure_capped)
    failed: str | None = None  # why the child did not finish (measure_capped): killed at the cap, timed out

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


def _child_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure_capped(name: str, fn: Callable, *args, cap_bytes: int | None = None,
                   timeout: float | None = None) -> Measurement:
    """Like `measure`, but the parent watches the child's RssAnon (every 20 ms) and kills it past
    `cap_bytes` or `timeout` seconds: a contender that would exhaust the machine's RAM (ComfyUI loading
    two full models) gives its failure and the memory it reached, a result rather than an OOM. The
    returned `failed` says why it stopped; `seconds`/`peak_anon` are then what it reached."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    cpu0 = _child_cpu()
    p = ctx.Process(target=_child, args=(fn, args, q))
    t0 = time.perf_counter()
    p.start()
    peak, failed = 0, None
    while p.is_alive():
        try:
            peak = max(peak, rss_anon_bytes(p.pid))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            break
        elapsed = time.perf_counter() - t0
        if cap_bytes is not None and peak > cap_bytes:
            failed = f"killed at the {cap_bytes / 2**30:.1f} GB RssAnon cap after {elapsed:.0f} s"
        elif timeout is not None and elapsed > timeout:
            failed = f"stopped after the {timeout:.0f} s time limit"
        if failed:
            p.kill()
            break
        time.sleep(0.02)
    p.join()
    wall = time.perf_counter() - t0
    cpu = _child_cpu() - cpu0
    if failed is None and p.exitcode != 0:
        failed = f"exit {p.exitcode}" + (" (killed: out of memory?)" if p.exitcode == -9 else "")
    if failed is None:
        dt, child_peak, base = q.get()
        return Measurement(name, dt, max(peak, child_peak), base, cpu)
    return Measurement(name, wall, peak, 0, cpu, failed)


def run_contender(name: str, fn: Callable, args: tuple, warm=(), outputs=(), repeat: int = 1,
                  cap_bytes: int | None = None, timeout: float | None = None) -> Measurement:
    """The shared contender loop of the bench scripts: `repeat` runs of fn(*args) in fresh children, each
    after warming `warm` (drop_page_cache_hint) and deleting `outputs` of the run before (a folder: the
    .safetensors files in it, whatever a contender named them); the fastest run is kept, with its CPU
    seconds. A failed run (see measure_capped) ends the repeats and is returned."""
    best = None
    for _ in range(max(1, repeat)):
        for o in outputs:
            for f in (Path(o).glob("*.safetensors") if os.path.isdir(o) else [Path(o)]):
                f.unlink(missing_ok=True)
        if sum(os.path.getsize(p) for p in warm) < mem_available() // 2:
            drop_page_cache_hint(warm)
        elif hasattr(os, "sync"):  # inputs larger than RAM: warming them would only evict each other
            os.sync()
        m = measure_capped(name, fn, *args, cap_bytes=cap_bytes, timeout=timeout)
        if m.failed:
            return m
        if best is None or m.seconds < best.seconds:
            best = m
    assert best is not None
    return best


def stream_copy(inputs, out, out_bytes: int | None = None, chunk: int = 64 << 20) -> None:
    """The floor of a file-to-file operation: every byte of `inputs` read in large sequential reads, and
    `out_bytes` (default: the first input's size) of them written to `out` through a temporary file,
    fsync'd and renamed, as weightsmith's writer does. No arithmetic, no parsing."""
    want = os.path.getsize(inputs[0]) if out_bytes is None else out_bytes
    buf = bytearray(chunk)
    view = memoryview(buf)
    tmp = f"{out}.tmp-copy"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        for _ in range(64):  # every input read once; again only while the output asks for more bytes
            for path in inputs:
                with open(path, "rb", buffering=0) as f:
                    while n := f.readinto(view):
                        if written < want:
                            k = min(n, want - written)
                            os.write(fd, view[:k])
                            written += k
            if written >= want:
                break
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, out)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


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
