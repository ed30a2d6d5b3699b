"""Speeds of this machine for the pre-run estimates (`estimate.py`), measured briefly and cached.

Measured once per device (about 0.3 s): single-thread fp32 elementwise speed (the weighted-sum kernel
the streaming engines run: copy a bf16 block to fp32, scale, add, cast back), GEMM flops on the device
(fp32 matrix products of the randomized SVD's shape) and the write speed of the cache folder. Read speed
is sampled from the inputs themselves (up to 16 MB each, once per file and process): warm inputs read at
page-cache speed, cold ones at the disk's.

Cached in memory per process and in `$XDG_CACHE_HOME/weightsmith/calibration.json` (~/.cache by
default) per device, torch version and core count, for a week. `WEIGHTSMITH_CALIBRATION` overrides the
measurement for reproducible estimates (tests, CI): `elementwise=2e8,gemm=5e10,read=1e9,write=5e8`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CACHE_SECONDS = 7 * 24 * 3600
DEFAULT_READ_BPS = 500e6
READ_SAMPLE = 16 << 20
_memory: dict[str, Calibration] = {}
_read_memory: dict[str, float] = {}


@dataclass(frozen=True)
class Calibration:
    elementwise_per_s: float  # fp32 element-passes per second, one thread
    gemm_flops: float  # fp32 GEMM flops per second on the device
    read_bps: float  # bytes per second (used when no input can be sampled)
    write_bps: float
    measured: float = 0.0  # time.time() of the measurement
    load: float = 0.0  # the 1-minute load average when it was measured (see _stale)


def _override() -> Calibration | None:
    text = os.environ.get("WEIGHTSMITH_CALIBRATION", "").strip()
    if not text:
        return None
    values = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    try:
        return Calibration(float(values.get("elementwise", 2e8)), float(values.get("gemm", 5e10)),
                           float(values.get("read", 1e9)), float(values.get("write", 5e8)), time.time())
    except ValueError:
        return None


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _stale(entry: dict) -> bool:
    """A cached measurement is measured again when it is a week old, or when it was taken on a busy machine
    (load above the core count) that is now at most half as busy: speeds measured under load would make
    every later estimate too slow (seen: GEMM 5.8 GFLOP/s at load 16 vs 22 GFLOP/s at load 2)."""
    if time.time() - entry["measured"] >= CACHE_SECONDS:
        return True
    then = float(entry.get("load", 0.0))
    return then > (os.cpu_count() or 1) and _load() < then / 2


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "weightsmith" / "calibration.json"


def _key(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{device.type}:{name}|torch {torch.__version__}|{os.cpu_count()} cores"


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_elementwise(device: torch.device, n: int = 1 << 23, block: int = 1 << 18) -> float:
    """Element-passes per second of the weighted-sum kernel on one thread (4 passes per input element),
    as the engines run it: a bf16 input much larger than the caches, in blocks of 256K elements whose
    fp32 temporaries stay in cache, written to a bf16 output as large as the input."""
    src = torch.randn(n).to(torch.bfloat16).to(device)
    out = torch.empty(n, dtype=torch.bfloat16, device=device)
    step = block if device.type == "cpu" else n
    x = torch.empty(step, device=device)
    y = torch.zeros(step, device=device)

    def kernel():
        for lo in range(0, n, step):
            x.copy_(src[lo:lo + step])
            y.mul_(0.5).add_(x, alpha=0.5)
            out[lo:lo + step].copy_(y)
        _sync(device)

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        kernel()
        return 4 * n / _best(kernel)
    finally:
        torch.set_num_threads(threads)


def measure_gemm(device: torch.device, m: int = 1024, q: int = 256) -> float:
    a = torch.randn(m, m, device=device)
    b = torch.randn(m, q, device=device)

    def kernel():
        (a @ b).sum()
        _sync(device)

    kernel()
    return 2.0 * m * m * q / _best(kernel)


def measure_write(n: int = 16 << 20, repeat: int = 3) -> float:
    """Bytes per second written into the page cache (as the streaming writer does; the kernel writes back
    meanwhile), the best of `repeat` fresh files. Not fsynced: one small fsync measures the disk's
    latency more than its speed."""
    folder = cache_file().parent
    data = os.urandom(1 << 20) * (n >> 20)
    best = 0.0
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(repeat):
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-") as f:
                t0 = time.perf_counter()
                f.write(data)
                f.flush()
                best = max(best, n / max(time.perf_counter() - t0, 1e-6))
    except OSError:
        pass
    return best or DEFAULT_READ_BPS


def calibrate(device: torch.device | str = "cpu") -> Calibration:
    """This machine's speeds for `device`: the override, the process cache, the file cache, or measured."""
    device = torch.device(device)
    fixed = _override()
    if fixed is not None:
        return fixed
    key = _key(device)
    if key in _memory:
        return _memory[key]
    path = cache_file()
    try:
        stored = json.loads(path.read_text())
        entry = stored.get(key)
        if entry and not _stale(entry):
            _memory[key] = Calibration(**entry)
            return _memory[key]
    except (OSError, ValueError, TypeError, KeyError):
        stored = {}
    cal = Calibration(measure_elementwise(device), measure_gemm(device), DEFAULT_READ_BPS, measure_write(),
                      time.time(), _load())
    _memory[key] = cal
    try:
        stored = stored if isinstance(stored, dict) else {}
        stored[key] = asdict(cal)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measured again next time
    return cal


def read_speed(path: str | os.PathLike) -> float:
    """Bytes per second reading `path` (a sample from its middle), once per file and process."""
    fixed = _override()
    if fixed is not None:
        return fixed.read_bps
    path = Path(path)
    key = str(path.resolve()) if path.exists() else str(path)
    if key in _read_memory:
        return _read_memory[key]
    try:
        size = path.stat().st_size
        n = min(READ_SAMPLE, size)
        if n < (1 << 20):
            return DEFAULT_READ_BPS
        with open(path, "rb", buffering=0) as f:
            t0 = time.perf_counter()
            got = len(os.pread(f.fileno(), n, max(0, size // 2 - n // 2)))
            speed = got / max(time.perf_counter() - t0, 1e-6)
    except OSError:
        speed = DEFAULT_READ_BPS
    _read_memory[key] = speed
    return speed
