"""Executing a merge plan: key by key, reading only the tensors each key needs, fp32 math on the chosen
device, one cast at the end, written through the streaming writer (atomic: no partial file ever).

Peak memory follows the largest tensor, never the model: inputs are memory-mapped, and methods whose
rows are independent (`chunkable`) get a tensor in row blocks of about 256K elements, so their fp32
temporaries stay in cache. Row blocks are grouped into tasks that worker threads compute and write
straight to their place in the output (pipeline.KeyPipeline): the arithmetic and the copy into the page
cache run on every core, and no whole merged tensor is held.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..devices import resolve_device
from ..dtypes import FP8_DTYPES, cast_for_output, dtype_name
from ..encodings.encode import (
    KeyOutput,
    OutputChoice,
    OutputLayout,
    ScaledRows,
    finite_amax,
    fp8_scale,
    parse_output,
    quantize_fp8,
    scaled_rows,
    source_encoding,
)
from ..encodings.fp8 import decode_fp8, fast_decodable
from ..encodings.gguf_write import GGUF_OUTPUT_TYPES, GGUFStreamWriter, gguf_output_type
from ..engine import KeyJob, all_finite, has_nan, run_keys, sum_is_finite, written_finite
from ..errors import BadFileError, WeightsmithError
from ..pipeline import TASK_ELEMS, WorkerBuffers, default_workers, row_ranges
from ..progress import ProgressFn
from ..safetensors_io import StreamingWriter
from .fp8_fused import NativeWeightedSum, native_weighted_sum
from .methods import METHODS, derive_seed
from .plan import KeyPlan, MergePlan, plan_merge
from .report import KeyStats, MergeReport
from .ties_native import NativeTies, native_ties

CPU_CHUNK_ELEMS = 1 << 18  # 1 MB of fp32 per input: temporaries stay in cache, few ops (measured fastest)
CUDA_CHUNK_ELEMS = 1 << 24  # 64 MB of fp32 per input: keeps a GPU busy; the few staging buffers stay small
# A whole-tensor (non-row-wise) merge whose fp32 inputs exceed this runs alone, with all cores and
# nothing else in memory beside it, instead of as one task among others.
ALONE_BYTES = 64 << 20
NATIVE_TIES_ELEMS = 1 << 16  # TIES keys from this size take the native passes (smaller ones: torch, as cheap)
QUANT_ELEMS = 1 << 22  # elements per quantization range of a key written encoded (4 MB of fp8 written at once)


def output_dtype(kp: KeyPlan, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a key is written in: the requested one for float tensors, else the input's own."""
    if dtype is not None and kp.in_dtype.is_floating_point:
        return dtype
    return kp.in_dtype


def _store(dst: torch.Tensor, y: torch.Tensor) -> None:
    if dst.dtype in FP8_DTYPES:
        y = cast_for_output(y, dst.dtype)
    dst.copy_(y)


STATS_SAMPLE_EVERY = 16  # with stats="sample", every 16th row block of a large tensor feeds the report's sums








def _block_sums(xs: list[torch.Tensor], y: torch.Tensor) -> tuple[list[float], list[float], float]:
    """The report's sums over one block: |xᵢ|², x_A·xᵢ and |y − x_A|² (Python floats, i.e. float64)."""
    a = xs[0].reshape(-1)
    sq, dot = [], [0.0]
    vecdot = torch.linalg.vecdot  # measured faster than torch.dot on one thread
    for i, x in enumerate(xs):
        f = x.reshape(-1)
        sq.append(float(vecdot(f, f)))
        if i:
            dot.append(float(vecdot(a, f)))
    d = y.reshape(-1) - a
    return sq, dot, float(vecdot(d, d))


@dataclass
class _TaskResult:
    """What one task of a key reports: the sums of its sampled blocks (in block order), and whether its
    written values hold NaN/Inf (`nonfinite`) and NaN in particular (`nan`)."""

    sums: list[tuple[list[float], list[float], float]]
    nonfinite: bool = False
    nan: bool = False
    unsampled: bool = False
    amax: float = 0.0  # max |value| over finite values (keys written encoded)


def _check_written(stored: torch.Tensor, y: torch.Tensor | None, result: _TaskResult) -> None:
    """Judge finiteness on the values as written; fp8 has no sum kernel and saturates on the cast
    (cast_for_output), so there the fp32 result `y` raises the suspicion."""
    probe = y if (stored.dtype in FP8_DTYPES and y is not None) else stored
    if not sum_is_finite(probe) and not all_finite(stored):
        result.nonfinite = True
        result.nan = has_nan(stored)


class _MergeContext:
    """What every task of one merge shares: the plan, device, dtype, writer and per-thread buffers."""

    def __init__(self, plan: MergePlan, dev: torch.device, out_dtype: torch.dtype | None, chunk: int,
                 sample_every: int, writer: StreamingWriter | None, layout: OutputLayout | None = None,
                 workers: int = 1):
        self.plan = plan
        self.layout = layout
        self.dev = dev
        self.out_dtype = out_dtype
        self.chunk = chunk
        self.sample_every = sample_every
        self.writer = writer
        self.buffers = WorkerBuffers()
        self.results = _ResultBuffers()
        self.workers = workers
        self.inference = torch.is_inference_mode_enabled()
        self._pool: ThreadPoolExecutor | None = None

    def job(self, kp: KeyPlan, finish) -> KeyJob:
        """A key's work for the engine: which task computes it, by row blocks or whole, plain or encoded."""
        drain = kp.action in ("take", "merge") and self.decoded_and_large(kp)
        ko = self.layout.keys.get(kp.out_key) if self.layout is not None else None
        encoded = ko is not None and ko.fmt is not None
        big = kp.numel * 4 * len(kp.reads) > ALONE_BYTES  # whole-tensor and big: alone, with all cores
        if kp.action == "take":
            task = partial(self.encode_take, ko, self.inputs(kp)[0]) if encoded else \
                partial(self.take_task, kp, self.inputs(kp)[0])
            return KeyJob([task], finish, drain=drain)
        if kp.action != "merge":
            return KeyJob([], finish)
        if kp.action == "merge" and kp.method == "ties" and self.dev.type == "cpu" and kp.numel >= NATIVE_TIES_ELEMS:
            native = native_ties(kp, self.row_inputs(kp), dict(kp.params))
            if native is not None:
                return self.ties_job(kp, ko, native, finish)
        if self.blockwise(kp):
            full = self.row_inputs(kp)
            # inputs read by rows (mapped pages, or fp8 payloads decoded a block at a time) hold no whole
            # decoded copy: such a key need not be alone in flight
            drain = drain and any(self.decoded(kp, j) and not isinstance(t, ScaledRows) for j, t in enumerate(full))
            cols = kp.numel // kp.shape[0]
            step = max(1, self.chunk // cols)
            ranges = row_ranges(kp.shape[0], cols, step, max(self.chunk, TASK_ELEMS))
            if encoded:  # row blocks into one fp32 result, quantized by the workers once all are in (amax of the whole)
                native = native_weighted_sum(kp, full, dict(kp.params)) if self.dev.type == "cpu" else None
                # natively, the rows' amax first and the sum recomputed when quantizing: no fp32 result kept
                y = None if native is not None else self.results.take(kp.numel)
                quant = _Quantization(self, kp, ko, y, native, full)
                return KeyJob([partial(self.encode_rows_task, kp, full, y, native, r0, r1, step) for r0, r1 in ranges],
                              _then(quant.finish, finish), then=quant.tasks, drain=drain)
            # decoded inputs are freed with the key's last task, not at the next key
            native = native_weighted_sum(kp, full, dict(kp.params)) if self.dev.type == "cpu" else None
            return KeyJob([partial(self.rows_task, kp, full, r0, r1, step, native) for r0, r1 in ranges], finish,
                          drain=drain)
        task = partial(self.encoded_task, kp, ko, self.inputs(kp)) if encoded else \
            partial(self.whole_task, kp, self.inputs(kp))
        return KeyJob([] if big else [task], finish, alone=task if big else None, drain=drain)

    def ties_job(self, kp: KeyPlan, ko: KeyOutput | None, nt: NativeTies, finish) -> KeyJob:
        """A TIES key in passes over element ranges (ties_native.py): the threshold's top bits, its low
        bits, the merged values into one fp32 result, then quantized (written encoded) or cast and
        written. `finish` gets the merged ranges' results (sums, NaN/Inf), as from the torch route."""
        n = kp.numel
        ranges = [(lo, min(n, lo + TASK_ELEMS)) for lo in range(0, n, TASK_ELEMS)]
        starts = [lo for lo, _ in ranges]
        y = self.results.take(n)
        merged: list[_TaskResult] = []
        quant = _Quantization(self, kp, ko, y) if ko is not None and ko.fmt is not None else None

        def apply_phase():
            tasks = [partial(self._ties_apply, nt, y, lo, hi) for lo, hi in ranges]
            return tasks, after_apply

        def after_top(results):
            nt.choose_top(results)
            return [partial(nt.hist_low, lo, hi) for lo, hi in ranges], after_low

        def after_low(results):
            nt.choose_low(starts, results)
            return apply_phase()

        def after_apply(results):
            merged[:] = results
            if quant is not None:
                return quant.tasks(results)
            return [partial(self._cast_write, kp, y, r, lo, hi) for r, (lo, hi) in zip(results, ranges)]

        def done(_results) -> None:
            if quant is not None:
                quant.finish(merged)
            else:
                self.results.give_back(y)
            finish(merged)

        if nt.trivial():
            nt.choose_trivial(starts)
            tasks, then = apply_phase()
            return KeyJob(tasks, done, then=then)
        return KeyJob([partial(nt.hist_top, lo, hi) for lo, hi in ranges], done, then=after_top)

    def _ties_apply(self, nt: NativeTies, y: torch.Tensor, lo: int, hi: int) -> _TaskResult:
        amax, sums = nt.apply(lo, hi, y[lo:hi], self.sample_every > 0)
        result = _TaskResult([sums] if sums is not None else [])
        result.amax = _note_amax(y[lo:hi], result) if not math.isfinite(amax) else amax
        return result

    def _cast_write(self, kp: KeyPlan, y: torch.Tensor, result: _TaskResult, lo: int, hi: int) -> None:
        """Elements [lo, hi) of a merged fp32 result stored in the output dtype and written at their place."""
        want = output_dtype(kp, self.out_dtype)
        part = y[lo:hi]
        out = part if want == torch.float32 else self.buffers.get("out", hi - lo, want)
        if out is not part:
            _store(out, part)
        _check_written(out, part, result)
        if self.writer is not None:
            self.writer.write_at(kp.out_key, lo * out.element_size(), out)

    def inputs(self, kp: KeyPlan) -> list[torch.Tensor]:
        """The key's input tensors (memory-mapped views; read on the calling thread, so sources need not
        be thread-safe)."""
        return [self.plan.sources[i].get(raw) for i, raw in kp.reads]

    def decoded_and_large(self, kp: KeyPlan) -> bool:
        """Whether a key's inputs come decoded (quantized files: fresh fp32 memory, not mapped pages) and
        are large enough that only one such key should be in flight at a time."""
        return kp.numel * 4 * len(kp.reads) > ALONE_BYTES and any(self.decoded(kp, j) for j in range(len(kp.reads)))

    def decoded(self, kp: KeyPlan, j: int) -> bool:
        """Whether the key's j-th input is stored encoded (its source decodes it)."""
        i, raw = kp.reads[j]
        return getattr(self.plan.sources[i], "encoding", lambda _: None)(raw) is not None

    def method_args(self, kp: KeyPlan) -> tuple:
        method = METHODS[kp.method]
        params = dict(kp.params)
        if method.random:
            params["seed"] = derive_seed(params.get("seed", 0), kp.name)
        return method.fn, list(kp.weights), params

    def blockwise(self, kp: KeyPlan) -> bool:
        """Whether a merged key is processed in row blocks."""
        return (METHODS[kp.method].chunkable and len(kp.shape) >= 2 and kp.numel > self.chunk
                and kp.shape[0] > 1)

    def rows_task(self, kp: KeyPlan, full: list[torch.Tensor], r0: int, r1: int, step: int,
                  native: NativeWeightedSum | None = None) -> _TaskResult:
        """Merge rows [r0, r1) of a key block by block into this thread's staging buffer, then write them.
        With `native`, blocks that feed no report sums are summed in one native pass (same bits)."""
        fn, weights, params = self.method_args(kp)
        inplace = METHODS[kp.method].inplace
        want = output_dtype(kp, self.out_dtype)
        cols = kp.numel // kp.shape[0]
        staging = self.buffers.get("out", (r1 - r0) * cols, want)
        result = _TaskResult([])
        on_cpu = self.dev.type == "cpu"
        for b0 in range(r0, r1, step):
            b1 = min(r1, b0 + step)
            n = (b1 - b0) * cols
            shape = (b1 - b0, *kp.shape[1:])
            sampled = self.sample_every > 0 and (b0 // step) % self.sample_every == 0
            dst = staging[(b0 - r0) * cols:(b1 - r0) * cols].view(shape)
            if native is not None and not sampled:
                y = self.buffers.get("rows", n, torch.float32).view(shape)
                if native.sum(b0 * cols, b1 * cols, y):
                    _store(dst, y)
                    if want in FP8_DTYPES:
                        _check_written(dst, y, result)
                    result.unsampled = True
                    continue
            xs = []
            for i, t in enumerate(full):
                if isinstance(t, ScaledRows):  # decoded into this thread's buffer: any method may use it as scratch
                    xs.append(t.rows(b0, b1, self.dev, out=self._decode_buffer(i, n)))
                    continue
                block = t[b0:b1]
                if on_cpu and block.dtype == torch.float32 and inplace is None:
                    xs.append(block)  # methods never write their inputs: the mapped file is read in place
                elif on_cpu:
                    xs.append(_to_fp32(block, self.buffers.get(f"in{i}", n, torch.float32).view(shape)))
                else:
                    xs.append(block.to(self.dev, torch.float32))  # a fresh copy on the device
            # the report's sums need the inputs intact: sampled blocks take the pure function (same bits)
            y = (fn if sampled or inplace is None else inplace)(xs, weights, **params)
            _store(dst, y)  # from a GPU, copy_ casts there and moves the narrower bytes
            if want in FP8_DTYPES:
                _check_written(dst, y, result)
            if sampled:
                result.sums.append(_block_sums(xs, y))
            else:
                result.unsampled = True
        if want not in FP8_DTYPES:
            _check_written(staging, None, result)
        if self.writer is not None:
            self.writer.write_at(kp.out_key, r0 * cols * staging.element_size(), staging)
        return result

    def _decode_buffer(self, i: int, n: int) -> torch.Tensor | None:
        """This thread's reused fp32 buffer for input i's decoded rows on the CPU (None on a GPU: rows are
        decoded there, into fresh device memory)."""
        return self.buffers.get(f"dec{i}", n, torch.float32) if self.dev.type == "cpu" else None

    def whole_task(self, kp: KeyPlan, full: list[torch.Tensor]) -> _TaskResult:
        """Merge a key as one tensor (small, 1-D, or a method that needs the whole tensor)."""
        fn, weights, params = self.method_args(kp)
        xs = [t.to(self.dev, torch.float32) for t in full]
        y = fn(xs, weights, **params)
        if tuple(y.shape) != kp.shape:
            raise WeightsmithError(f"{kp.name!r}: method {kp.method} returned shape {list(y.shape)}, "
                                   f"expected {list(kp.shape)}")
        out = cast_for_output(y, output_dtype(kp, self.out_dtype))
        result = _TaskResult([_block_sums(xs, y)] if self.sample_every else [])
        _check_written(out, y, result)
        del xs, y
        if self.writer is not None:
            self.writer.write(kp.out_key, out.cpu())
        return result

    def row_inputs(self, kp: KeyPlan) -> list:
        """Like `inputs`, but a tensor-wise scaled fp8 input is handed out as its stored payload with row
        access (scaled_rows): row blocks are decoded on the worker threads, and no input is held decoded
        whole (the values are the decoded source's own: one fp32 multiply by the scale)."""
        out = []
        for i, raw in kp.reads:
            src = self.plan.sources[i]
            rows = scaled_rows(src, raw)
            out.append(rows if rows is not None else src.get(raw))
        return out

    def encode_rows_task(self, kp: KeyPlan, full: list, y: torch.Tensor | None, native: NativeWeightedSum | None,
                         r0: int, r1: int, step: int) -> _TaskResult:
        """Merge rows [r0, r1) of a key written encoded into its fp32 result buffer `y`, noting their amax
        (the key is quantized once every row is in: `_Quantization`). With `native` (y None) only the
        amax is computed here, where the native pass can (fp8_fused.py), the other blocks the generic
        way into a buffer of this thread's."""
        fn, weights, params = self.method_args(kp)
        inplace = METHODS[kp.method].inplace
        cols = kp.numel // kp.shape[0]
        result = _TaskResult([])
        for b0 in range(r0, r1, step):
            b1 = min(r1, b0 + step)
            shape = (b1 - b0, *kp.shape[1:])
            xs = []
            sampled = self.sample_every > 0 and (b0 // step) % self.sample_every == 0
            if native is not None and not sampled:  # one native pass over the fp8 rows, nothing stored
                amax = native.amax(b0 * cols, b1 * cols)
                if amax is not None:
                    result.amax = max(result.amax, amax)
                    result.unsampled = True
                    continue
            dst = (y[b0 * cols:b1 * cols] if y is not None else
                   self.buffers.get("rows", (b1 - b0) * cols, torch.float32)).view(shape)
            for i, t in enumerate(full):
                n = (b1 - b0) * cols
                if isinstance(t, ScaledRows):  # decoded into this thread's buffer: an in-place method may use it
                    # the first input straight into the result's rows: an in-place method then leaves its
                    # result there (weighted_sum_ does), sparing a copy of every element
                    into = dst if (i == 0 and inplace is not None and not sampled and self.dev.type == "cpu") \
                        else self._decode_buffer(i, n)
                    xs.append(t.rows(b0, b1, self.dev, out=into))
                    continue
                block = t[b0:b1]
                if self.dev.type != "cpu":
                    xs.append(block.to(self.dev, torch.float32))
                elif block.dtype == torch.float32 and inplace is None:
                    xs.append(block)  # methods never write their inputs: the mapped file is read in place
                else:
                    xs.append(_to_fp32(block, self.buffers.get(f"in{i}", n, torch.float32).view(shape)))
            yb = (fn if sampled or inplace is None else inplace)(xs, weights, **params)
            result.amax = max(result.amax, _note_amax(yb, result))
            if sampled:
                result.sums.append(_block_sums(xs, yb))
            else:
                result.unsampled = True
            if y is not None and yb.data_ptr() != dst.data_ptr():
                dst.copy_(yb)
        return result

    def finish_encoded(self, kp: KeyPlan, ko: KeyOutput, y: torch.Tensor, results: list[_TaskResult]) -> None:
        """Quantize a key's whole fp32 result computed in one piece (`encoded_task`) and write payload +
        scale: `_Quantization`'s ranges, here spread over a pool of their own (this runs inside a task, or
        alone on the calling thread, where the pipeline cannot take follow-up tasks)."""
        quant = _Quantization(self, kp, ko, y)
        tasks = quant.tasks(results)
        if len(tasks) > 1 and self.workers > 1:
            for f in [self._quant_pool().submit(t) for t in tasks]:
                f.result()
        else:
            for t in tasks:
                t()
        quant.finish(results)

    def _quantize_range(self, ko: KeyOutput, y: torch.Tensor, scale: torch.Tensor, saturate: bool,
                        lo: int, hi: int) -> None:
        """Quantize y[lo:hi] into this thread's fp8 staging buffer and write it at its place."""
        assert ko.fmt is not None
        with torch.inference_mode(self.inference), torch.no_grad():  # the mode y was made in (per thread)
            stage = self.buffers.get("quant", hi - lo, ko.fmt.fp8)
            q = quantize_fp8(y[lo:hi], scale, ko.fmt.fp8, out=stage, saturate=saturate, inplace=True)
            if self.writer is not None:
                self.writer.write_at(ko.key, lo, q)

    def _quant_pool(self) -> ThreadPoolExecutor:
        """Threads for the quantization of encoded keys, which runs when a key's rows are all in (the key
        pipeline's workers are busy with the next keys then; the operating system shares the cores)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="weightsmith-quant")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def encoded_task(self, kp: KeyPlan, ko: KeyOutput, full: list[torch.Tensor]) -> _TaskResult:
        """Merge a key written encoded with a method that needs the whole tensor: the fp32 result once,
        then quantized with the fresh scale amax / fp8 max of the merged values."""
        assert ko.fmt is not None
        fn, weights, params = self.method_args(kp)
        result = _TaskResult([])
        xs = [t.to(self.dev, torch.float32) for t in full]
        y = fn(xs, weights, **params)
        if tuple(y.shape) != kp.shape:
            raise WeightsmithError(f"{kp.name!r}: method {kp.method} returned shape {list(y.shape)}, "
                                   f"expected {list(kp.shape)}")
        if self.sample_every:
            result.sums.append(_block_sums(xs, y))
        del xs
        result.amax = _note_amax(y, result)
        self.finish_encoded(kp, ko, y.reshape(-1).cpu(), [result])
        return result

    def encode_take(self, ko: KeyOutput, t: torch.Tensor) -> None:
        """Copy a key from one input, encoded afresh (its value decoded to fp32, a new scale from its amax:
        an input written by ComfyUI, whose largest value sits at the fp8 maximum, comes back bit for bit)."""
        assert ko.fmt is not None
        y = t.float()
        scale = fp8_scale(finite_amax(y), ko.fmt.fp8)
        q = quantize_fp8(y, scale, ko.fmt.fp8)
        if self.writer is not None:
            self.writer.write(ko.key, q.reshape(ko.shape))
            self.writer.write(ko.scale_key, scale)

    def take_task(self, kp: KeyPlan, t: torch.Tensor) -> None:
        """Copy a key (`t`, read from one input) to the output, cast to the output dtype if asked."""
        want = output_dtype(kp, self.out_dtype)
        if t.dtype != want:
            cast = cast_for_output(t.float(), want)
            # a narrower dtype can turn finite values into inf; the input's own NaN/Inf are copied
            if not sum_is_finite(cast.float() if want in FP8_DTYPES else cast) and not all_finite(cast) \
                    and all_finite(t):
                raise _overflow_error(kp, self.plan, want)
            t = cast
        if self.writer is not None and t.is_floating_point() and not written_finite(t):
            raise _nonfinite_error(kp, self.plan, [self.plan.inputs[kp.reads[0][0]].label])
        if self.writer is not None:
            self.writer.write(kp.out_key, t)


STATS_MODES = ("sample", "full", "off")


class _Quantization:
    """The second phase of a key written fp8-scaled from row blocks: once every block's amax is in, the
    fresh scale amax / fp8 max, and the key quantized range by range on the workers (`tasks`): its
    stored fp32 result in place, or, with `native`, the sum recomputed from the fp8 inputs straight into
    fp8 (fp8_fused.py). `finish` (calling thread, key order) writes the scale and frees the buffer."""

    def __init__(self, ctx: _MergeContext, kp: KeyPlan, ko: KeyOutput, y: torch.Tensor | None,
                 native: NativeWeightedSum | None = None, full: list | None = None):
        self.ctx, self.kp, self.ko, self.y, self.native = ctx, kp, ko, y, native
        self.full = full  # the key's row inputs (read on the calling thread), for `native`'s fallback
        self.scale: torch.Tensor | None = None

    def tasks(self, results: list[_TaskResult]) -> list:
        assert self.ko.fmt is not None
        self.scale = fp8_scale(max((r.amax for r in results), default=0.0), self.ko.fmt.fp8)
        saturate = any(r.nonfinite for r in results)  # finite values divided by amax / max stay in range
        n = self.kp.numel
        if self.native is None:
            assert self.y is not None
            return [partial(self.ctx._quantize_range, self.ko, self.y, self.scale, saturate, lo, min(n, lo + QUANT_ELEMS))
                    for lo in range(0, n, QUANT_ELEMS)]
        if saturate:  # NaN/Inf in the sum: the key's finish refuses it (or reports it on a dry run)
            return []
        return [partial(self._native_range, lo, min(n, lo + QUANT_ELEMS)) for lo in range(0, n, QUANT_ELEMS)]

    def _native_range(self, lo: int, hi: int) -> None:
        assert self.native is not None and self.ko.fmt is not None and self.scale is not None
        stage = self.ctx.buffers.get("quant", hi - lo, self.ko.fmt.fp8)
        if not self.native.quantize(lo, hi, float(self.scale), stage):
            # a flush-to-zero thread (the kernel's small codes would be lost): the generic route's bytes
            assert self.full is not None
            fn, weights, params = self.ctx.method_args(self.kp)
            y = _generic_flat(self.full, fn, weights, params, lo, hi, self.kp.numel // self.kp.shape[0],
                              self.ctx.buffers.get("rows", hi - lo, torch.float32))
            quantize_fp8(y, self.scale, self.ko.fmt.fp8, out=stage, saturate=True, inplace=True)
        if self.ctx.writer is not None:
            self.ctx.writer.write_at(self.ko.key, lo, stage)

    def finish(self, results: list[_TaskResult]) -> None:
        assert self.scale is not None
        if self.ctx.writer is not None:
            self.ctx.writer.write(self.ko.scale_key, self.scale)
        if self.y is not None:
            self.ctx.results.give_back(self.y)


def _generic_flat(full: list, fn, weights, params, lo: int, hi: int, cols: int, out: torch.Tensor) -> torch.Tensor:
    """Elements [lo, hi) of a row-wise method's result over flat ranges that may cut rows: computed row
    by row block over the rows they touch, copied into `out`."""
    r0, r1 = lo // cols, -(-hi // cols)
    xs = [t.rows(r0, r1, torch.device("cpu")) if isinstance(t, ScaledRows) else t[r0:r1].float() for t in full]
    y = fn(xs, weights, **params).reshape(-1)[lo - r0 * cols:hi - r0 * cols]
    return out.copy_(y)


def _to_fp32(block: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """`block` converted into the fp32 buffer `buf` (same shape). A plain fp8 block takes the vectorised
    decoder (torch converts fp8 one element at a time on the CPU), the same values bit for bit."""
    if fast_decodable(block):
        return decode_fp8(block, out=buf)
    return buf.copy_(block)


class _ResultBuffers:
    """The fp32 result buffers of keys written encoded, reused from key to key: a fresh buffer per key
    cost more in page faults than the merge arithmetic (measured: ~70% of a scaled-fp8 merge's system
    time). A buffer is taken when a key's job is made and given back when the key is written; there are
    as many as keys in flight at once (one for a large key, `decoded_and_large`), each kept at the
    largest size it served. Used on the calling thread only."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def take(self, numel: int) -> torch.Tensor:
        """A flat fp32 tensor of `numel` elements (uninitialised)."""
        sizes = [b.numel() for b in self._free]
        fits = [j for j, size in enumerate(sizes) if size >= numel]
        if fits:
            buf = self._free.pop(min(fits, key=sizes.__getitem__))
        else:  # replace the largest: the number of buffers stays the number of keys in flight
            if self._free:
                del self._free[max(range(len(sizes)), key=sizes.__getitem__)]
            buf = torch.empty(numel, dtype=torch.float32)
        return buf[:numel]

    def give_back(self, y: torch.Tensor) -> None:
        """Return a buffer that `take` handed out (its key is written)."""
        base = y._base if y._base is not None else y
        self._free.append(base)


def _note_amax(y: torch.Tensor, result: _TaskResult) -> float:
    """max |y| over finite values, noting in `result` any NaN/Inf (judged on the fp32 values: the fp8
    payload saturates, so written values would hide an overflow)."""
    if y.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(y)
    m = max(-float(lo), float(hi))
    if m == m and m != float("inf"):
        return m
    result.nonfinite = True
    result.nan = result.nan or bool(torch.isnan(y).any())
    return finite_amax(y)


def _then(first, then):
    """A key's finish that runs `first(results)`, then `then(results)`."""
    def finish(results: list) -> None:
        first(results)
        then(results)
    return finish


def kept_gguf_type(plan: MergePlan) -> str | None:
    """`keep` for a GGUF model A: the GGML type A stores most of its quantized weights in (the writer keeps
    the tensors GGUF files keep unquantized, as for an explicit gguf-… choice); None when A is not GGUF. A
    type weightsmith cannot encode (K-quants, IQ) is refused before anything is read."""
    counts: Counter[str] = Counter()
    for kp in plan.output_keys():
        i, raw = kp.reads[0]
        enc = source_encoding(plan.sources[i], raw)
        if i == 0 and enc is not None and enc.format.startswith("gguf:"):
            counts[enc.format.split(":", 1)[1]] += 1
    if not counts:
        return None
    qtype = counts.most_common(1)[0][0]
    if qtype not in GGUF_OUTPUT_TYPES.values():
        raise WeightsmithError(f"A ({plan.inputs[0].name}) is stored as GGUF {qtype}, which weightsmith cannot encode "
                               "(the gguf package decodes K-quant and IQ types but cannot write them), so keep cannot "
                               "keep it: choose gguf-q8_0, gguf-q5_1, gguf-q4_1 or gguf-f16, or a .safetensors output "
                               "in bf16. Nothing was written")
    return qtype


def output_layout(plan: MergePlan, choice: OutputChoice) -> OutputLayout:
    """How every output key is written: `keep` takes each key's encoding from the input its value comes
    from (A for merged keys); errors for what cannot be written come here, before anything is read."""
    layout = OutputLayout(choice, plan.out_prefix)
    for kp in plan.output_keys():
        i, raw = kp.reads[0]
        src = plan.sources[i]
        layout.add(kp.out_key, kp.shape, output_dtype(kp, choice.dtype), kp.name if kp.part == "unet" else None,
                   source_encoding(src, raw), src, raw, f"{plan.inputs[i].label} ({plan.inputs[i].name})")
    layout.check()
    return layout


def _check_inputs_finite(plan: MergePlan, kp: KeyPlan, policies: list[str]) -> list[str]:
    """Which inputs of a key whose result is not finite hold NaN/Inf (the rare path: only then are the
    inputs scanned); a source whose policy is "error" stops the merge, naming file and key."""
    bad = []
    for i, raw in kp.reads:
        if not all_finite(plan.sources[i].get(raw)):
            bad.append(plan.inputs[i].label)
            if policies[i] == "error":
                raise BadFileError(f"{plan.sources[i].name}: tensor {raw!r} contains NaN or Inf values (the file is "
                                   "corrupt or the model diverged); download the file again, or leave the key out "
                                   f"of the merge with a rule such as '{re.escape(kp.name)}=take:A' or "
                                   f"'{re.escape(kp.name)}=drop'")
    return bad




def _nonfinite_error(kp: KeyPlan, plan: MergePlan, bad_inputs: list[str]) -> WeightsmithError:
    """An output key would hold NaN/Inf: a broken model, so the merge stops whatever the input policy."""
    files = ", ".join(f"{plan.inputs[i].label} {plan.inputs[i].name}" for i, _ in kp.reads)
    key = re.escape(kp.name)
    if not bad_inputs:
        return WeightsmithError(f"{kp.out_key!r} (merged from {files}): the {kp.method} merge made NaN from finite "
                                f"inputs (weights {', '.join(f'{w:g}' for w in kp.weights) or 'default'}); check the "
                                "weights and the method's parameters. Nothing was written")
    culprits = ", ".join(f"{plan.inputs[i].label} {plan.inputs[i].name}" for i, _ in kp.reads
                         if plan.inputs[i].label in bad_inputs)
    good = [inp.label for inp in plan.inputs if inp.label not in bad_inputs]
    rules = (f"'{key}=take:{good[0]}' or " if good else "") + f"'{key}=drop'"
    how = "taken from" if kp.action == "take" else "merged from"
    return BadFileError(f"{kp.out_key!r} ({how} {files}) would hold NaN or Inf values: {culprits} holds them in this "
                        "tensor (the file is corrupt or the model diverged). A model with NaN/Inf weights is broken, so "
                        f"nothing was written: download that file again, or leave the key out with a rule such as {rules}")


def _overflow_error(kp: KeyPlan, plan: MergePlan, dtype: torch.dtype) -> WeightsmithError:
    """The merged values of a key overflow the output dtype (or fp32 itself) although every input is
    finite: writing them would store inf. Say which key and what to change (the dtype or the weights)."""
    name = dtype_name(dtype)
    files = ", ".join(f"{plan.inputs[i].label} {plan.inputs[i].name}" for i, _ in kp.reads)
    wider = "a smaller magnitude (weights closer to 0)" if dtype == torch.float32 else (
        "a wider --dtype (bf16 or fp32), or smaller weights")
    return WeightsmithError(f"{kp.out_key!r} (merged from {files}): the merged values exceed {name}'s range "
                            f"(±{torch.finfo(dtype).max:.6g}) and would be written as inf; use {wider}. "
                            "Nothing was written")


def stamp_merge(plan: MergePlan, out_path) -> dict[str, str]:
    """The merge's metadata with the provenance keys (provenance.py): architecture and naming of A."""
    from ..arch import detect_arch
    from ..provenance import stamp

    info = detect_arch(plan.sources[0])
    return stamp(plan.metadata, output=out_path, operation="merge", arch=info.arch, details=info.details,
                 sources=plan.sources, merged=True, naming=info.naming, summary=plan.summary())


def execute_merge(
    plan: MergePlan,
    out_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    stats: str = "sample",
    chunk_elems: int | None = None,
    threads: int | None = None,
) -> MergeReport:
    """Run `plan`, writing `out_path` (None: a dry run that computes everything and writes nothing).

    `dtype` None/'keep' keeps each key's input dtype, and A's ComfyUI scaled-fp8 / mixed-precision encoding
    (encodings/encode.py; an encoding it cannot write back is refused before anything is read); a dtype
    name casts every float tensor; 'fp8_scaled[_e5m2]' writes the diffusion model's Linear weights as
    ComfyUI scaled fp8. Floats are computed in fp32 and cast (or quantized with a fresh scale) once. `stats`: the
    report's similarity/change sums over every element ("full"), over every 16th row block of tensors
    large enough to be processed in blocks ("sample", default: the full sums cost a third of the merge
    time), or not at all ("off"); output NaN/Inf are detected in every mode. `threads`: worker threads
    (default: one per core, see pipeline.default_workers)."""
    if stats is True or stats is False:
        stats = "sample" if stats else "off"
    if stats not in STATS_MODES:
        raise WeightsmithError(f"stats mode {stats!r}: choose one of {', '.join(STATS_MODES)}")
    sample_every = {"full": 1, "sample": STATS_SAMPLE_EVERY, "off": 0}[stats]
    gguf_type = gguf_output_type(dtype)  # a GGUF output: keys computed in fp32, quantized by its writer
    if gguf_type is None and out_path is not None and Path(out_path).suffix.lower() == ".gguf":
        if not parse_output(dtype).keep:
            raise WeightsmithError(f"output {out_path}: a .gguf file is written with a GGUF output dtype (gguf-q8_0, "
                                   "gguf-q5_1, gguf-q4_1, gguf-f16 …), or with keep when model A is a GGUF file")
        gguf_type = kept_gguf_type(plan)
        if gguf_type is None:
            raise WeightsmithError(f"output {out_path}: keep writes a .gguf only when model A is a GGUF file; choose a "
                                   "GGUF output dtype (gguf-q8_0, gguf-q5_1, gguf-q4_1, gguf-f16 …) or a .safetensors "
                                   "output")
        dtype = f"gguf-{gguf_type.lower()}"
    choice = parse_output(torch.float32 if gguf_type else dtype)
    out_dtype = choice.dtype
    layout = output_layout(plan, choice)
    dev = resolve_device(device or "cpu")
    chunk = chunk_elems or (CUDA_CHUNK_ELEMS if dev.type == "cuda" else CPU_CHUNK_ELEMS)
    key_stats: list[KeyStats] = []
    writer = None
    if out_path is not None:
        make = partial(GGUFStreamWriter, qtype=gguf_type) if gguf_type else StreamingWriter
        writer = make(out_path, layout.writer_plan(), layout.metadata(stamp_merge(plan, out_path)), protect=plan.protect_paths(),
                      overwrite=overwrite)
    # Inputs are not scanned for NaN/Inf up front (a full extra pass over every tensor): a non-finite
    # input shows in the merged output, which is checked for free, and only then are its inputs scanned.
    policies = [getattr(s, "nonfinite", "report") for s in plan.sources]
    # the worker count is read here: inside the run torch is held to one thread per worker
    ctx = _MergeContext(plan, dev, out_dtype, chunk, sample_every, writer, layout, threads or default_workers(dev))
    t0 = time.perf_counter()

    def finisher(kp: KeyPlan, ks: KeyStats):
        def finish(results: list) -> None:
            if kp.action == "merge":
                n = len(kp.reads)
                sq, dot, change = [0.0] * n, [0.0] * n, 0.0
                for r in results:  # added in block order: the sums do not depend on thread timing
                    for bsq, bdot, bchange in r.sums:
                        sq = [x + y for x, y in zip(sq, bsq)]
                        dot = [x + y for x, y in zip(dot, bdot)]
                        change += bchange
                if sample_every:
                    ks.sq, ks.dot, ks.change = sq, dot, change
                    ks.sampled = any(r.unsampled for r in results)
                # NaN/Inf in the written values that come from the inputs (or a NaN the method made) are
                # reported with the inputs that hold them; ±inf from finite inputs is an overflow of the
                # output dtype (or of fp32): refused, since the user can widen the dtype.
                if any(r.nonfinite for r in results):
                    bad_inputs = _check_inputs_finite(plan, kp, policies)
                    if not bad_inputs and not any(r.nan for r in results):
                        ko = layout.keys.get(kp.out_key)
                        encoded = ko is not None and ko.fmt is not None  # fp8 scaled saturates nothing: fp32 overflowed
                        raise _overflow_error(kp, plan, torch.float32 if encoded else output_dtype(kp, out_dtype))
                    if writer is not None:  # never write NaN/Inf, whatever the input policy; a dry run reports them
                        raise _nonfinite_error(kp, plan, bad_inputs)
                    ks.finite = False
                    ks.nonfinite_inputs = bad_inputs
            key_stats.append(ks)
        return finish

    def prefetch(kp: KeyPlan) -> None:
        for i, raw in kp.reads:
            ahead = getattr(plan.sources[i], "prefetch", None)  # sources made elsewhere may not read ahead
            if ahead is not None:
                ahead(raw)

    def jobs():
        labels: dict[tuple[int, ...], list[str]] = {}  # one list per combination of inputs read
        for n, kp in enumerate(plan.keys):
            # the next key's bytes are read ahead while this one computes (inputs larger than the page
            # cache: a full-size pair on a 24 GB machine)
            if n + 1 < len(plan.keys):
                prefetch(plan.keys[n + 1])
            if n == 0:
                prefetch(kp)
            which = tuple(i for i, _ in kp.reads)
            reads = labels.get(which)
            if reads is None:
                reads = labels[which] = [plan.inputs[i].label for i in which]
            ks = KeyStats(kp.name, kp.group, kp.action, kp.method, kp.numel, reads=reads, decided_by=kp.decided_by)
            yield ctx.job(kp, finisher(kp, ks))

    try:
        run_keys(jobs(), len(plan.keys), writer=writer, sources=plan.sources, device=dev, threads=threads,
                 progress=progress, before=layout.write_extras)
    finally:
        ctx.close()
    seconds = time.perf_counter() - t0
    return MergeReport(
        plan=plan,
        out_path=Path(out_path) if out_path is not None else None,
        dtype=dtype if gguf_type else choice.name if out_dtype is None else str(out_dtype).replace("torch.", ""),
        device=str(dev),
        seconds=seconds,
        bytes_written=writer.total_bytes if writer is not None else 0,
        key_stats=key_stats,
        stats=stats,
        encodings=layout.summary() if layout.encoded else {},
    )


def merge(
    models,
    out: str | os.PathLike | None,
    method: str = "weighted_sum",
    weights=None,
    rules=None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    missing: str = "take",
    params=None,
    presets=None,
    others: str = "copy",
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Plan and execute in one call: `merge([a, b], "out.safetensors", "weighted_sum", [0.5, 0.5])`."""
    plan = plan_merge(models, method, weights, rules, missing, params, presets, others)
    return execute_merge(plan, out, dtype, device, progress, overwrite)
