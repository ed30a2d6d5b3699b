"""The lossless mix of one key in native passes (encodings/fp8_native.c, `ws_mix`), where it gives the torch
route's bytes: fp32 compute, inputs stored as fp32, bf16 or e4m3 (a scaled-fp8 file's payload is read
by ranges with its scale folded in, never decoded whole), no full statistics (dry runs and `stats=True`
take the torch route), and an output that is fp32 (a key written encoded gathers its picks in fp32) or
the candidates' own 16-bit dtype (the picks' bits copied).

Why: the torch route spends some twenty passes per chunk (conversions, distances, comparison, masks,
the integer blend, counting); one native pass per tile measured ~5x less CPU per element. The result is
the same: each distance is the same fp32 operations in the same order, the comparison the same strict
one, the written element the picked candidate's own (tests/test_fp8_native.py compares both routes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .encodings import fp8_native
from .encodings.encode import KeyOutput, finite_amax, fp8_scale, quantize_fp8, scaled_rows
from .encodings.fp8 import decode_fp8, keeps_subnormals, kernel_input
from .mix_report import ChunkStats
from .pipeline import WorkerBuffers


@dataclass(frozen=True)
class NativeInput:
    """One input of a key as the kernel reads it: the stored flat tensor, its kind, the factor an e4m3
    payload is multiplied by (2^120 · scale), and its scale (None: 1) for the torch decoder's fallback."""

    flat: torch.Tensor
    kind: int
    factor: float
    scale: torch.Tensor | None

    def as_fp32(self, lo: int, hi: int) -> tuple[torch.Tensor, int, float]:
        """Elements [lo, hi) for the kernel as fp32 (a thread that flushes subnormals: the e4m3 route's small
        codes would be lost, so the torch decoder converts them first)."""
        part = self.flat[lo:hi]
        if self.kind != fp8_native.KIND_E4M3:
            return part, self.kind, 1.0
        return decode_fp8(part, self.scale), fp8_native.KIND_F32, 1.0


def native_input(source, key: str) -> NativeInput | None:
    """How the kernel reads `key` of `source`, or None (a dtype it does not read, a scale it cannot fold)."""
    rows = scaled_rows(source, key)
    if rows is not None:
        got = kernel_input(rows.payload, rows.scale) if rows.payload.dtype == torch.float8_e4m3fn else None
        return None if got is None else NativeInput(*got, rows.scale)
    got = kernel_input(source.get(key))
    return None if got is None else NativeInput(*got, None)


def native_out_kind(ins: list[NativeInput], out_dtype: torch.dtype) -> int | None:
    """How the picks are written: fp32 values, or the candidates' own 16-bit patterns; None: torch route."""
    if out_dtype == torch.float32:
        return fp8_native.OUT_F32
    if out_dtype == torch.bfloat16 and all(x.kind == fp8_native.KIND_BF16 for x in ins[1:]):
        return fp8_native.OUT_RAW16
    return None


def native_mix_task(ins: list[NativeInput], scales: list[float], mode: str, out_kind: int, out_dtype: torch.dtype,
                    lo: int, hi: int, key: str, writer, buffers: WorkerBuffers,
                    dest: torch.Tensor | None = None) -> ChunkStats:
    """Mix elements [lo, hi) of one key (ins[0] the reference) into this thread's staging buffer and write
    them at their place, or into `dest` (a key written encoded); the shares taken and the finiteness
    flag in a ChunkStats like the torch route's."""
    stats = ChunkStats(len(ins) - 1, False)
    out = dest[lo:hi] if dest is not None else buffers.get("out", hi - lo, out_dtype)
    if keeps_subnormals():
        parts = [(x.flat[lo:hi], x.kind, x.factor) for x in ins]
    else:
        parts = [x.as_fp32(lo, hi) for x in ins]
    taken, dist_max = fp8_native.mix(parts[0], parts[1:], list(scales), mode == "max", out, out_kind)
    stats.taken = taken
    stats.elements = hi - lo
    stats.nonfinite = not (dist_max < float("inf"))
    if dest is not None:
        stats.amax = finite_amax(out)  # the key is quantized with the amax of all its picks (EncodedPicks)
    elif writer is not None:
        writer.write_at(key, lo * out.element_size(), out)
    return stats


class EncodedPicks:
    """A mixed key written encoded (fp8-scaled), by either route: once every range's picks are in `dest`
    (fp32, each task noting their amax), the fresh scale amax / fp8 max, the ranges quantized on the
    workers (`tasks`, the engine's follow-up phase), and the scale written by `finish` (calling thread,
    key order). Before, the whole key was quantized on the calling thread while the workers waited."""

    def __init__(self, ko: KeyOutput, dest: torch.Tensor, writer, buffers: WorkerBuffers, step: int):
        self.ko, self.dest, self.writer, self.buffers, self.step = ko, dest, writer, buffers, step
        self.scale: torch.Tensor | None = None

    def tasks(self, results: list[ChunkStats]) -> list:
        assert self.ko.fmt is not None
        self.scale = fp8_scale(max((r.amax for r in results), default=0.0), self.ko.fmt.fp8)
        n = self.dest.numel()
        return [partial(self._quantize, lo, min(n, lo + self.step)) for lo in range(0, n, self.step)]

    def _quantize(self, lo: int, hi: int) -> None:
        assert self.ko.fmt is not None and self.scale is not None
        stage = self.buffers.get("quant", hi - lo, self.ko.fmt.fp8)
        quantize_fp8(self.dest[lo:hi], self.scale, self.ko.fmt.fp8, out=stage)
        if self.writer is not None:
            self.writer.write_at(self.ko.key, lo, stage)

    def finish(self) -> None:
        if self.writer is not None and self.scale is not None:
            self.writer.write(self.ko.scale_key, self.scale)
