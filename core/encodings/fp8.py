"""fp8 payloads to fp32 on the CPU, bit for bit what `q.to(torch.float32) * scale` gives, several times faster.

torch 2.x converts fp8 to fp32 on the CPU one element at a time (measured ~200-300 M elements/s on one
core: three quarters of a scaled-fp8 merge), while its integer and fp16 -> fp32 kernels are vectorised
(several G elements/s). An fp8 code maps onto fp16 by moving bits, with the value divided by a power of
two, and fp16 -> fp32 is exact:

* e5m2 is the upper byte of fp16 (same exponent width and bias): `code << 8` viewed as fp16 is the value,
  infinities and NaN included.
* e4m3fn `s eeee mmm` becomes fp16 `s 0eeee mmm0000000`: exponent bias 15 instead of 7 and the same
  subnormal spacing, so the fp16 value is exactly the e4m3 value / 2^8 for every finite code, subnormals
  included. Its NaN codes (`s 1111 111`) land on ±1.875 (±480 after the factor, not an e4m3 value): a
  cheap pass over the bytes finds them, and only then are they set to NaN.

The factor 2^8 is folded into the scale: (q / 2^8) · (2^8 · s) is the same real number as q · s, rounded
once to fp32, so the result equals the reference bit for bit (2^8 · s is exact unless it overflows, then
the two factors are applied one after the other, each exact or the same single rounding).

Work runs in row chunks of about 256K elements (the int16 scratch stays in cache) into one output
tensor; a large tensor's chunks are spread over a few threads (torch releases the GIL), unless torch was
asked to use one thread (a caller that is itself one of several worker threads).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

FAST_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
CHUNK_ELEMS = 1 << 18  # int16 scratch 512 KB: stays in cache (measured fastest of 64K..4M)
PARALLEL_ELEMS = 1 << 22  # below this, one thread: the hand-off costs more than it saves
E4M3_SHIFT = 256.0  # a moved e4m3 code's fp16 value is its value / 2^8
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


def _decode_range(flat_q: torch.Tensor, flat_out: torch.Tensor, factor: torch.Tensor | None,
                  factor2: torch.Tensor | None, lo: int, hi: int) -> None:
    scratch, mask = _scratch(min(CHUNK_ELEMS, hi - lo))
    for a in range(lo, hi, CHUNK_ELEMS):
        b = min(hi, a + CHUNK_ELEMS)
        h = _chunk_to_f16(flat_q[a:b], scratch[: b - a])
        dst = flat_out[a:b]
        dst.copy_(h)  # fp16 -> fp32: exact
        if factor is not None:
            dst.mul_(factor)
            if factor2 is not None:
                dst.mul_(factor2)
        if flat_q.dtype == torch.float8_e4m3fn:
            _e4m3_nan_fix(flat_q[a:b], dst, mask[: b - a])


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


def _factors(scale: torch.Tensor | None, e4m3: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The factor(s) a moved fp16 value is multiplied by: 2^8 · s (or 2^8 then s when 2^8 · s
    overflows), s for e5m2, 2^8 alone without a scale; (None, None) when nothing multiplies."""
    if scale is None:
        return (torch.tensor(E4M3_SHIFT), None) if e4m3 else (None, None)
    s = scale.to(torch.float32)
    if not e4m3:
        return s, None
    return fold_shift(s)


def fold_shift(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(2^8 · scale, None), exact; or (2^8, scale) where 2^8 · scale would overflow a finite scale."""
    s = scale.to(torch.float32)
    f = s * E4M3_SHIFT
    if bool((torch.isinf(f) & torch.isfinite(s)).any()):
        return torch.tensor(E4M3_SHIFT), s
    return f, None


def decode_fp8(q: torch.Tensor, scale: torch.Tensor | None = None, out: torch.Tensor | None = None,
               shifted: bool = False) -> torch.Tensor:
    """`q.to(float32) * scale` (a one-element `scale`, or none) for an fp8 CPU tensor `q`, bit for bit,
    into `out` (a contiguous fp32 tensor of q's size) or a new tensor of q's shape. `shifted` (no scale):
    e4m3 values are left divided by 2^8 (`E4M3_SHIFT`), for a caller that folds the 2^8 into a scale it
    applies per row or block (`fold_shift`)."""
    assert fast_decodable(q), q.dtype
    if scale is not None:
        scale = scale.reshape(())
    q = q.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32)
    flat_q, flat_out = q.reshape(-1), out.view(-1)
    factor, factor2 = (None, None) if shifted else _factors(scale, q.dtype == torch.float8_e4m3fn)
    _run_ranges(q.numel(), lambda lo, hi: _decode_range(flat_q, flat_out, factor, factor2, lo, hi))
    return out
