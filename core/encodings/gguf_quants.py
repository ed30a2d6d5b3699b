"""GGML block formats decoded in torch, on any device, one tensor at a time.

Each decoder takes the raw blocks of one tensor as a uint8 tensor of shape (n_blocks, type_size) and
returns fp32 values of shape (n_blocks, block_size). The arithmetic follows the reference decoders of
the `gguf` package (gguf/quants.py) operation by operation, in fp32, so the values are bit-identical to
`gguf.quants.dequantize` (tested on random blocks); only the bit unpacking is written for torch (no
uint32 shifts: 32-bit masks are unpacked byte by byte, little-endian as GGML stores them).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

QK_K = 256  # super-block size of the K-quants

# name -> (block_size, type_size): the GGML layout of each format decoded here
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "BF16": (1, 2),
    "Q4_0": (32, 2 + 16),
    "Q4_1": (32, 2 + 2 + 16),
    "Q5_0": (32, 2 + 4 + 16),
    "Q5_1": (32, 2 + 2 + 4 + 16),
    "Q8_0": (32, 2 + 32),
    "Q2_K": (256, 2 + 2 + QK_K // 16 + QK_K // 4),
    "Q3_K": (256, 2 + QK_K // 4 + QK_K // 8 + 12),
    "Q4_K": (256, 2 + 2 + QK_K // 2 + 12),
    "Q5_K": (256, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    "Q6_K": (256, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    "IQ4_NL": (32, 2 + 16),
    "IQ4_XS": (256, 2 + 2 + QK_K // 2 + QK_K // 64),
}

IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """Consecutive byte fields of each block; the last one takes the rest."""
    return list(torch.split(blocks, [*sizes, blocks.shape[1] - sum(sizes)], dim=1))


def _f16(b: torch.Tensor) -> torch.Tensor:
    """A 2-byte little-endian fp16 field -> fp32, shape (n, 1)."""
    return b.contiguous().view(torch.float16).float()


@functools.lru_cache(maxsize=64)
def _shift_tensor(shifts: tuple[int, ...], at: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(shifts, dtype=torch.uint8, device=device).reshape((len(shifts),) + (1,) * at)


def _shifted(x: torch.Tensor, shifts: tuple[int, ...], at: int) -> torch.Tensor:
    """`x` with a new axis of length len(shifts) inserted before `at`-th from the end, each slice x >> s."""
    return x.unsqueeze(-at - 1) >> _shift_tensor(shifts, at, x.device)


def _bits32(b: torch.Tensor) -> torch.Tensor:
    """Bit j (0..31) of a little-endian 32-bit field, as uint8 0/1, shape (n, 32)."""
    return (_shifted(b, tuple(range(8)), 0) & 1).reshape(b.shape[0], 32)


def _nibbles(qs: torch.Tensor, half: int) -> torch.Tensor:
    """Low nibbles of each group of `half` bytes, then the high nibbles: GGML's 4-bit element order."""
    n = qs.shape[0]
    return (_shifted(qs.reshape(n, -1, half), (0, 4), 1) & 0x0F).reshape(n, -1)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _split(blocks, 2)
    q = _nibbles(qs, 16).to(torch.int8) - 8
    return _f16(d) * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qs = _split(blocks, 2, 2)
    return (_f16(d) * _nibbles(qs, 16).float()) + _f16(m)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qh, qs = _split(blocks, 2, 4)
    q = (_nibbles(qs, 16) | (_bits32(qh) << 4)).to(torch.int8) - 16
    return _f16(d) * q.float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qh, qs = _split(blocks, 2, 2, 4)
    q = _nibbles(qs, 16) | (_bits32(qh) << 4)
    return (_f16(d) * q.float()) + _f16(m)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _split(blocks, 2)
    return qs.contiguous().view(torch.int8).float() * _f16(d)


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return (blocks.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins packed in 12 bytes (Q4_K, Q5_K), as fp32 (n, 8)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs, d, dmin = _split(blocks, QK_K // 16, QK_K // 4, 2)
    dl = (_f16(d) * (scales & 0xF).float()).reshape(n, QK_K // 16, 1)
    ml = (_f16(dmin) * (scales >> 4).float()).reshape(n, QK_K // 16, 1)
    q = (_shifted(qs.reshape(n, -1, 32), (0, 2, 4, 6), 1) & 3).reshape(n, QK_K // 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, scales, d = _split(blocks, QK_K // 8, QK_K // 4, 12)
    lo = _shifted(scales[:, :8], (0, 4), 1).reshape(n, 16)
    hi = _shifted(scales[:, 8:], (0, 2, 4, 6), 1).reshape(n, 16)
    sc = (((lo & 0x0F) | ((hi & 0x03) << 4)).to(torch.int8) - 32).float()
    dl = (_f16(d) * sc).reshape(n, 16, 1)
    ql = _shifted(qs.reshape(n, -1, 32), (0, 2, 4, 6), 1).reshape(n, 16, QK_K // 16) & 3
    qh = (_shifted(hmask.reshape(n, -1, 32), tuple(range(8)), 1).reshape(n, 16, QK_K // 16) & 1) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()  # the offset 4 applies where the mask bit is 0
    return (dl * q).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin, scales, qs = _split(blocks, 2, 2, 12)
    sc, mn = _k_scale_min(scales)
    dd = (_f16(d) * sc).reshape(n, -1, 1)
    dm = (_f16(dmin) * mn).reshape(n, -1, 1)
    q = (_shifted(qs.reshape(n, -1, 32), (0, 4), 1) & 0x0F).reshape(n, -1, 32).float()
    return (dd * q - dm).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin, scales, qh, qs = _split(blocks, 2, 2, 12, QK_K // 8)
    sc, mn = _k_scale_min(scales)
    dd = (_f16(d) * sc).reshape(n, -1, 1)
    dm = (_f16(dmin) * mn).reshape(n, -1, 1)
    ql = (_shifted(qs.reshape(n, -1, 32), (0, 4), 1) & 0x0F).reshape(n, -1, 32)
    qhb = (_shifted(qh.reshape(n, -1, 32), tuple(range(8)), 1) & 1).reshape(n, -1, 32)
    q = (ql | (qhb << 4)).float()
    return (dd * q - dm).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh, scales, d = _split(blocks, QK_K // 2, QK_K // 4, QK_K // 16)
    dd = (_f16(d) * scales.contiguous().view(torch.int8).float()).reshape(n, QK_K // 16, 1)
    lo = (_shifted(ql.reshape(n, -1, 64), (0, 4), 1) & 0x0F).reshape(n, -1, 32)
    hi = (_shifted(qh.reshape(n, -1, 32), (0, 2, 4, 6), 1) & 0x03).reshape(n, -1, 32)
    q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()
    return (dd * q).reshape(n, QK_K)


def _iq4_lookup(idx: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(IQ4_VALUES, dtype=torch.int8, device=idx.device)
    return table[idx.long()].float()


def _iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _split(blocks, 2)
    return _f16(d) * _iq4_lookup(_nibbles(qs, 16))


def _iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, sh, sl, qs = _split(blocks, 2, 2, QK_K // 64)
    lo = (_shifted(sl, (0, 4), 0) & 0x0F).reshape(n, -1)  # low nibble then high nibble of each byte
    hbits = sh.contiguous().view(torch.int16).to(torch.int32).reshape(n, 1) & 0xFFFF
    hi = (hbits >> torch.arange(0, 16, 2, device=blocks.device, dtype=torch.int32)).to(torch.uint8) & 0x03
    sc = ((lo | (hi << 4)).to(torch.int8) - 32).float()
    dl = (_f16(d) * sc).reshape(n, -1, 1)
    q = _iq4_lookup(_nibbles(qs.reshape(n * (QK_K // 32), 16), 16)).reshape(n, -1, 32)
    return (dl * q).reshape(n, -1)


DECODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "BF16": _bf16,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
}


CPU_CHUNK_VALUES = 1 << 15  # decoded per step on a CPU: the temporaries stay in cache (measured 2-5x faster)
PARALLEL_MIN_STEPS = 4  # each decoding thread gets at least this many steps
_pool_of_pid: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """This process's decoding threads (a forked child gets its own: the parent's threads are not in it)."""
    with _pool_lock:
        pid = os.getpid()
        if pid not in _pool_of_pid:
            _pool_of_pid.clear()
            _pool_of_pid[pid] = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="weightsmith-gguf")
        return _pool_of_pid[pid]


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 values of one tensor from its raw bytes (uint8, any shape, on the device to compute on).
    On a CPU the blocks are decoded a slice at a time into the output (a whole-tensor pass would allocate
    and page-fault several tensor-sized temporaries), the slices of a large tensor spread over every core
    (torch releases the GIL; the merge runs torch single-threaded, so its own threads would not); on a GPU
    one pass keeps the device busy."""
    block_size, type_size = BLOCK_LAYOUT[qtype]
    flat = raw.reshape(-1)
    if flat.numel() % type_size:
        raise ValueError(f"{flat.numel()} bytes are not a whole number of {qtype} blocks of {type_size} bytes")
    blocks = flat.view(-1, type_size)
    decode = DECODERS[qtype]
    step = max(1, CPU_CHUNK_VALUES // block_size)
    n = blocks.shape[0]
    if raw.device.type != "cpu" or n <= step:
        return decode(blocks).reshape(shape)
    out = torch.empty((n, block_size), dtype=torch.float32)

    def run(lo: int, hi: int) -> None:
        for i in range(lo, hi, step):
            out[i:min(i + step, hi)] = decode(blocks[i:min(i + step, hi)])

    steps = -(-n // step)
    parts = min(os.cpu_count() or 1, steps // PARALLEL_MIN_STEPS)
    if parts <= 1:
        run(0, n)
    else:
        per = -(-steps // parts) * step
        for f in [_pool().submit(run, lo, min(lo + per, n)) for lo in range(0, n, per)]:
            f.result()
    return out.reshape(shape)
