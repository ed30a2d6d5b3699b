"""fp8 payloads to fp32 on the CPU, bit for bit what `q.to(torch.float32) * scale` gives, several times faster.

torch 2.x converts fp8 to fp32 on the CPU one element at a time (measured ~200-300 M elements/s on one
core: three quarters of a scaled-fp8 merge), while its integer kernels are vectorised (several G
elements/s). An fp8 code maps onto a wider float by moving bits, with the value divided by a power of two:

* e4m3fn `s eeee mmm` becomes fp32 `s 0000eeee mmm0…0`: the int8 code sign-extended to int32, shifted
  left by 20 and masked to the sign and those 7 bits (three vectorised integer passes straight into the
  fp32 output). Exponent bias 127 instead of 7 with the same subnormal spacing, so the fp32 value is
  exactly the e4m3 value / 2^120 for every finite code, subnormals included (they land on fp32
  subnormals, exact too). Its NaN codes (`s 1111 111`) land on ±480 / 2^120, not an e4m3 value: the
  chunk's min/max (one cheap pass) shows them, and only then are they set to NaN. (measured: 0.63 ns per
  element on one core, where the earlier fp16 route below took 1.1.) A thread that flushes fp32
  subnormals to zero (torch.set_flush_denormal) would lose the small codes: it takes the fp16 route.
* e5m2 is the upper byte of fp16 (same exponent width and bias): `code << 8` viewed as fp16 is the value,
  infinities and NaN included; fp16 -> fp32 is exact. (The same fp16 route serves e4m3 on a
  flush-to-zero thread: `s 0eeee mmm0000000`, the value / 2^8, NaN codes on ±1.875.)

The power of two is folded into the scale: (q / 2^k) · (2^k · s) is the same real number as q · s,
rounded once to fp32, so the result equals the reference bit for bit (2^k · s is exact unless it
overflows, then the two factors are applied one after the other, each exact or the same single rounding).

Where the optional native kernels are built (fp8_native.py: a C compiler on the machine), an e4m3 range
is decoded by one native pass with the same bits; the torch route below is the fallback and the reference.

Work runs in row chunks of about 256K elements (the scratch stays in cache) into one output tensor; a
large tensor's chunks are spread over a few threads (torch releases the GIL), unless torch was asked to
use one thread (a caller that is itself one of several worker threads).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import fp8_native

FAST_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
CHUNK_ELEMS = 1 << 18  # int16 scratch 512 KB: stays in cache (measured fastest of 64K..4M)
PARALLEL_ELEMS = 1 << 22  # below this, one thread: the hand-off costs more than it saves
E4M3_SHIFT = 2.0 ** 120  # a moved e4m3 code's fp32 value is its value / 2^120
E4M3_F16_SHIFT = 256.0  # on the fp16 route: its value / 2^8
E4M3_MASK = -0x78100000  # int32 0x87F00000: the sign bit and the code's 7 bits after the shift by 20
E4M3_MOVED_MAX = 448.0 / E4M3_SHIFT  # the largest finite e4m3 value, moved (its NaN codes land above)
_pool: tuple[ThreadPoolExecutor, int, int] | None = None  # (pool, workers, pid)


def fast_decodable(q: torch.Tensor) -> bool:
    """Whether `q` takes the fast path: an fp8 payload in CPU memory."""
    return q.dtype in FAST_DTYPES and q.device.type == "cpu"


_local = threading.local()


def _scratch(numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's int16 chunk scratch and byte mask buffer (reused: on a virtual machine a fresh MB
    costs ~0.5 ms of page faults, more than decoding it; measured)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].numel() < numel:
        bufs = _local.bufs = (torch.empty(numel, dtype=torch.int16), torch.empty(numel, dtype=torch.uint8))
    return bufs[0][:numel], bufs[1][:numel]


def _chunk_to_f16(q: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The fp16 bit pattern of a flat fp8 chunk in `scratch` (int16, same length); e4m3 values / 2^8."""
    if q.dtype == torch.float8_e5m2:
        scratch.copy_(q.view(torch.uint8))
        scratch.bitwise_left_shift_(8)
    else:
        scratch.copy_(q.view(torch.int8))  # sign-extended: bit 15 (and bit 14) take the sign
        scratch.bitwise_left_shift_(7).bitwise_and_(~0x4000)  # clear bit 14: fp16's top exponent bit is 0
    return scratch.view(torch.float16)


def _e4m3_nan_fix(q: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> None:
    """Set NaN where the e4m3fn payload holds its NaN codes (0x7f, 0xff): rare, so found with one cheap
    byte test (into `mask`, a uint8 buffer of q's length) before any per-element work."""
    nan = torch.bitwise_and(q.view(torch.uint8), 0x7F, out=mask).eq_(0x7F).view(torch.bool)  # 0/1 bytes
    if bool(nan.any()):
        out.masked_fill_(nan.view(out.shape), float("nan"))


def _e4m3_to_f32(q: torch.Tensor, dst: torch.Tensor, mask: torch.Tensor) -> None:
    """A flat e4m3fn chunk into the fp32 chunk `dst`: the values / 2^120 (NaN codes as NaN)."""
    bits = dst.view(torch.int32)
    bits.copy_(q.view(torch.int8))  # sign-extended: bit 31 takes the sign
    bits.bitwise_left_shift_(20).bitwise_and_(E4M3_MASK)
    lo, hi = torch.aminmax(dst)
    if float(hi) > E4M3_MOVED_MAX or float(lo) < -E4M3_MOVED_MAX:  # a NaN code moved to ±480 / 2^120
        _e4m3_nan_fix(q, dst, mask)


_TINY, _TWO = np.float32(2.0 ** -140), np.float32(2.0)  # an fp32 subnormal, and what doubles it


def keeps_subnormals() -> bool:
    """Whether this thread's fp32 arithmetic keeps subnormals (torch.set_flush_denormal(True) sets the
    CPU's flush-to-zero flags per thread; the e4m3 route's small codes are fp32 subnormals). Asked with a
    numpy scalar multiply, which runs on the same thread's flags (0.1 µs; a torch probe cost 10 µs per
    decoded block)."""
    return bool(_TINY * _TWO != 0)


def _decode_range(flat_q: torch.Tensor, flat_out: torch.Tensor, factor: torch.Tensor | None,
                  factor2: torch.Tensor | None, lo: int, hi: int, wide: bool) -> None:
    scratch, mask = _scratch(min(CHUNK_ELEMS, hi - lo))
    e4m3 = flat_q.dtype == torch.float8_e4m3fn
    if e4m3 and wide and fp8_native.library() is not None:  # one pass per range (fp8_native.c)
        f1 = 1.0 if factor is None else float(factor)
        f2 = None if factor2 is None else float(factor2)
        if fp8_native.decode_e4m3(flat_q[lo:hi], flat_out[lo:hi], f1, f2):
            _e4m3_nan_fix(flat_q[lo:hi], flat_out[lo:hi], torch.empty(hi - lo, dtype=torch.uint8))
        return
    for a in range(lo, hi, CHUNK_ELEMS):
        b = min(hi, a + CHUNK_ELEMS)
        dst = flat_out[a:b]
        if e4m3 and wide:
            _e4m3_to_f32(flat_q[a:b], dst, mask[: b - a])
        else:
            dst.copy_(_chunk_to_f16(flat_q[a:b], scratch[: b - a]))  # fp16 -> fp32: exact
            if e4m3:
                _e4m3_nan_fix(flat_q[a:b], dst, mask[: b - a])
        if factor is not None:
            dst.mul_(factor)
            if factor2 is not None:
                dst.mul_(factor2)


def _threads(numel: int) -> int:
    if numel < PARALLEL_ELEMS:
        return 1
    return max(1, min(torch.get_num_threads(), 8, numel // PARALLEL_ELEMS))


def _run_ranges(numel: int, work) -> None:
    """work(lo, hi) over [0, numel) split into chunk-aligned ranges, on up to `_threads` threads."""
    n = _threads(numel)
    if n == 1:
        work(0, numel)
        return
    global _pool
    # grown on demand; made anew in a forked child, where the parent's threads do not exist
    if _pool is None or _pool[1] < n or _pool[2] != os.getpid():
        _pool = (ThreadPoolExecutor(n, thread_name_prefix="weightsmith-fp8"), n, os.getpid())
    pool = _pool[0]
    per = math.ceil(math.ceil(numel / n) / CHUNK_ELEMS) * CHUNK_ELEMS
    futures = [pool.submit(work, lo, min(numel, lo + per)) for lo in range(per, numel, per)]
    work(0, min(numel, per))  # the caller does the first share itself
    for f in futures:
        f.result()


def _factors(scale: torch.Tensor | None, e4m3: bool, shift: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The factor(s) a moved value is multiplied by: 2^k · s (or 2^k then s when 2^k · s overflows), s
    for e5m2, 2^k alone without a scale; (None, None) when nothing multiplies."""
    if scale is None:
        return (torch.tensor(shift), None) if e4m3 else (None, None)
    s = scale.to(torch.float32)
    if not e4m3:
        return s, None
    return fold_shift(s, shift)


def fold_shift(scale: torch.Tensor, shift: float = E4M3_SHIFT) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(2^k · scale, None), exact; or (2^k, scale) where 2^k · scale would overflow a finite scale."""
    s = scale.to(torch.float32)
    f = s * shift
    if bool((torch.isinf(f) & torch.isfinite(s)).any()):
        return torch.tensor(shift), s
    return f, None


def decode_fp8(q: torch.Tensor, scale: torch.Tensor | None = None, out: torch.Tensor | None = None,
               factors: dict | None = None) -> torch.Tensor:
    """`q.to(float32) * scale` (a one-element `scale`, or none) for an fp8 CPU tensor `q`, bit for bit,
    into `out` (a contiguous fp32 tensor of q's size) or a new tensor of q's shape. `factors`: a dict the
    caller keeps for one scale across calls (a tensor decoded block by block), caching the folded factors
    (a handful of small torch ops per call otherwise)."""
    return _decode(q, scale, out, shifted=False, factors=factors)[0]


def decode_fp8_moved(q: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(values / 2^k, 2^k): e4m3 values left divided by a power of two (1 for e5m2), exact, for a caller
    that folds 2^k into a scale it applies per row or block (`fold_shift(scale, 2^k)`)."""
    return _decode(q, None, None, shifted=True)


def _decode(q: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor | None,
            shifted: bool, factors: dict | None = None) -> tuple[torch.Tensor, float]:
    assert fast_decodable(q), q.dtype
    if scale is not None:
        scale = scale.reshape(())
    q = q.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32)
    flat_q, flat_out = q.reshape(-1), out.view(-1)
    e4m3 = q.dtype == torch.float8_e4m3fn
    # asked on the calling thread; the decoder's pool threads start with subnormals kept (the default)
    wide = e4m3 and keeps_subnormals()
    shift = E4M3_SHIFT if wide else E4M3_F16_SHIFT
    if shifted:
        factor, factor2 = None, None
    elif factors is not None:
        if shift not in factors:
            factors[shift] = _factors(scale, e4m3, shift)
        factor, factor2 = factors[shift]
    else:
        factor, factor2 = _factors(scale, e4m3, shift)
    _run_ranges(q.numel(), lambda lo, hi: _decode_range(flat_q, flat_out, factor, factor2, lo, hi, wide))
    return out, (shift if e4m3 else 1.0)


_KERNEL_KINDS = {torch.float32: fp8_native.KIND_F32, torch.bfloat16: fp8_native.KIND_BF16,
                 torch.float8_e4m3fn: fp8_native.KIND_E4M3}


def kernel_input(t: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, int, float] | None:
    """How the native kernels read a stored tensor (times a one-element `scale`, e4m3 only): (flat
    tensor, kind, factor — 2^120 · scale for e4m3, the exact fold), or None where they cannot (another
    dtype or device, not contiguous, a scale whose fold overflows)."""
    kind = _KERNEL_KINDS.get(t.dtype)
    if kind is None or t.device.type != "cpu" or not t.is_contiguous():
        return None
    if kind != fp8_native.KIND_E4M3:
        return (t.reshape(-1), kind, 1.0) if scale is None else None
    f, then = fold_shift(torch.tensor(1.0) if scale is None else scale.reshape(()), E4M3_SHIFT)
    return None if then is not None else (t.reshape(-1), kind, float(f))
