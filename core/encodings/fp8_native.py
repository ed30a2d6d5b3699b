"""The optional native fp8 e4m3fn kernels (fp8_native.c): built once per machine with the C compiler
when one is installed, cached, loaded with ctypes; every caller falls back to the torch route (same
bits, several times slower) when they are not there.

Why native: decoding e4m3 in torch takes ~5 vectorised passes per block and quantizing two more, each
a Python call; a scaled-fp8 merge spent ~2.5 ns per element in them on this project's 2-core machine,
twice the time of the streaming copy it is benchmarked against. The kernels do each job in one pass
(measured numbers: docs/benchmarks.md). They change no result: tests/test_fp8_native.py checks them
bit for bit against the torch route (every code, every kind of scale, rounding boundaries).

The library is compiled with `-O3 -march=native -ffp-contract=off` (no fused multiply-add, no
fast-math: each fp32 operation rounds as torch's do) into `$WEIGHTSMITH_CACHE` (default
~/.cache/weightsmith)/native/, named by a hash of the source, the flags, the compiler and this CPU's
model and feature flags (a cache shared between machines never hands one a library built for
another). Compiled once, atomically (temp file + rename); a failed build is remembered for the
process and the torch route is used. `WEIGHTSMITH_NATIVE=0` turns the kernels off.

ctypes releases the GIL during each call, so the engine's worker threads run the kernels in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fp8_native.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
BUILD_TIMEOUT_S = 120

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_state = "not tried"  # "loaded", "off: <why>"


def cache_dir() -> Path:
    base = os.environ.get("WEIGHTSMITH_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "weightsmith") / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """The CPU's model and feature flags: -march=native code must not run on another CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _library_path(cc: str) -> Path:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), cc.encode(), _cpu_identity().encode(),
                 platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"fp8_native-{h.hexdigest()[:16]}.so"


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                             timeout=BUILD_TIMEOUT_S)
        if run.returncode != 0:
            raise OSError(f"{Path(cc).name} failed: {run.stderr.strip()[:300]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, f32, i32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    lib.ws_decode_e4m3.argtypes = [vp, vp, i64, f32, f32, i32]
    lib.ws_decode_e4m3.restype = i32
    lib.ws_wsum_e4m3.argtypes = [i32, vp, vp, vp, vp, i64, ctypes.POINTER(ctypes.c_uint32)]
    lib.ws_wsum_e4m3.restype = i32
    lib.ws_wsum_e4m3_amax.argtypes = [i32, vp, vp, vp, i64, ctypes.POINTER(ctypes.c_uint32)]
    lib.ws_wsum_e4m3_amax.restype = i32
    lib.ws_wsum_quantize_e4m3.argtypes = [i32, vp, vp, vp, i64, f32, vp]
    lib.ws_wsum_quantize_e4m3.restype = i32
    lib.ws_mix.argtypes = [i32, i32, vp, f32, vp, vp, vp, vp, i32, i64, i32, vp, vp, ctypes.POINTER(ctypes.c_uint32)]
    lib.ws_mix.restype = i32
    lib.ws_ties_hist.argtypes = [i32, vp, vp, vp, i32, i64, i32, vp, vp]
    lib.ws_ties_hist.restype = i32
    lib.ws_ties_apply.argtypes = [i32, vp, vp, vp, i32, i64, vp, vp, vp, i32, f32, vp, vp,
                                  ctypes.POINTER(ctypes.c_uint32)]
    lib.ws_ties_apply.restype = i32
    lib.ws_quantize_e4m3.argtypes = [vp, vp, i64, f32, i32]
    lib.ws_quantize_e4m3.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None where they are off or cannot be built."""
    global _lib, _state
    if _lib is not None or _state != "not tried":
        return _lib
    with _lock:
        if _lib is not None or _state != "not tried":
            return _lib
        if os.environ.get("WEIGHTSMITH_NATIVE", "1").strip().lower() in ("0", "off", "false", "no"):
            _state = "off: WEIGHTSMITH_NATIVE=0"
            return None
        if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64") or os.name != "posix":
            _state = f"off: not built on {platform.system()} {platform.machine()}"
            return None
        cc = _compiler()
        if cc is None:
            _state = "off: no C compiler (cc, gcc or clang) found"
            return None
        try:
            path = _library_path(cc)
            if not path.exists():
                _build(cc, path)
            _lib = _declare(ctypes.CDLL(str(path)))
            _state = "loaded"
        except (OSError, subprocess.SubprocessError) as e:
            _state = f"off: build failed ({e})"
            _lib = None
        return _lib


def state() -> str:
    """'loaded', or 'off: <why>' (after `library()` was asked), or 'not tried'."""
    return _state


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def decode_e4m3(q: torch.Tensor, out: torch.Tensor, f1: float, f2: float | None) -> bool:
    """out = moved(q) * f1 (* f2) over contiguous CPU tensors of one length; True when a NaN code was
    seen (`out` then holds finite stand-ins there)."""
    lib = library()
    assert lib is not None
    n = q.numel()
    return bool(lib.ws_decode_e4m3(_ptr(q), _ptr(out), n, f1, 1.0 if f2 is None else f2, f2 is not None))


def _inputs(qs: list[torch.Tensor], factors: list[float], weights: list[float]) -> tuple:
    k = len(qs)
    assert len(factors) == k == len(weights) and all(q.numel() == qs[0].numel() for q in qs)
    return (k, (ctypes.c_void_p * k)(*[_ptr(q) for q in qs]), (ctypes.c_float * k)(*factors),
            (ctypes.c_float * k)(*weights))


def bits_to_float(bits: int) -> float:
    """The fp32 whose bits are `bits`."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def wsum_e4m3(qs: list[torch.Tensor], factors: list[float], weights: list[float], y: torch.Tensor) -> tuple[bool, float]:
    """y = Σ (moved(q_j) · f_j) · w_j in input order (contiguous CPU tensors of one length); returns
    (a NaN code was seen, max |y| — inf or nan when y holds one)."""
    lib = library()
    assert lib is not None
    amax = ctypes.c_uint32(0)
    nan = lib.ws_wsum_e4m3(*_inputs(qs, factors, weights), _ptr(y), y.numel(), ctypes.byref(amax))
    return bool(nan), bits_to_float(amax.value)


def wsum_amax_e4m3(qs: list[torch.Tensor], factors: list[float], weights: list[float]) -> tuple[bool, float]:
    """(a NaN code was seen, max |Σ (moved(q_j) · f_j) · w_j|) without storing the sum."""
    lib = library()
    assert lib is not None
    amax = ctypes.c_uint32(0)
    nan = lib.ws_wsum_e4m3_amax(*_inputs(qs, factors, weights), qs[0].numel(), ctypes.byref(amax))
    return bool(nan), bits_to_float(amax.value)


def wsum_quantize_e4m3(qs: list[torch.Tensor], factors: list[float], weights: list[float], scale: float,
                       out: torch.Tensor) -> bool:
    """out (e4m3fn or uint8, contiguous, of the inputs' length) = e4m3(Σ (moved(q_j) · f_j) · w_j / scale);
    True when a NaN code was seen."""
    lib = library()
    assert lib is not None
    assert out.numel() == qs[0].numel() and out.is_contiguous() and out.element_size() == 1
    return bool(lib.ws_wsum_quantize_e4m3(*_inputs(qs, factors, weights), qs[0].numel(), scale, _ptr(out)))


def quantize_e4m3(y: torch.Tensor, out: torch.Tensor, scale: float, saturate: bool) -> None:
    """out (uint8 or e4m3fn view) = e4m3(y / scale), saturated to ±448 first when `saturate`."""
    lib = library()
    assert lib is not None
    lib.ws_quantize_e4m3(_ptr(y), _ptr(out), y.numel(), scale, int(saturate))


KIND_F32, KIND_BF16, KIND_E4M3 = 0, 1, 2  # how ws_mix reads an input (fp8_native.c)
OUT_F32, OUT_RAW16 = 0, 1


def mix(a: tuple[torch.Tensor, int, float], xs: list[tuple[torch.Tensor, int, float]], scales: list[float],
        mode_max: bool, out: torch.Tensor, out_kind: int) -> tuple[list[int], float]:
    """The lossless mix of one range (flat contiguous CPU tensors of one length; each input as (tensor,
    kind, factor)) into `out`; returns (elements taken per candidate, the largest |distance|: not finite
    when an input holds NaN/Inf or fp32 overflowed)."""
    lib = library()
    assert lib is not None
    n = len(xs)
    length = a[0].numel()
    assert 2 <= n <= 8 and all(x.numel() == length for x, _, _ in xs) and out.numel() == length
    kinds = (ctypes.c_int * n)(*[k for _, k, _ in xs])
    ptrs = (ctypes.c_void_p * n)(*[_ptr(x) for x, _, _ in xs])
    factors = (ctypes.c_float * n)(*[f for _, _, f in xs])
    sc = (ctypes.c_float * n)(*scales)
    taken = (ctypes.c_int64 * n)()
    dist = ctypes.c_uint32(0)
    rc = lib.ws_mix(n, a[1], _ptr(a[0]), a[2], kinds, ptrs, factors, sc, int(mode_max), length, out_kind, _ptr(out),
                    taken, ctypes.byref(dist))
    if rc != 0:
        raise ValueError(f"ws_mix refused its arguments ({rc})")
    return list(taken), bits_to_float(dist.value)
