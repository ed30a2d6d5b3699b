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
from ..encodings.gguf_write import GGUFStreamWriter, gguf_output_type
from ..errors import BadFileError, WeightsmithError
from ..pipeline import TASK_ELEMS, KeyPipeline, WorkerBuffers, default_workers, row_ranges
from ..progress import ProgressFn, no_progress
from ..safetensors_io import StreamingWriter
from .methods import METHODS, derive_seed
from .plan import KeyPlan, MergePlan, plan_merge
from .report import KeyStats, MergeReport

CPU_CHUNK_ELEMS = 1 << 18  # 1 MB of fp32 per input: temporaries stay in cache, few ops (measured fastest)
CUDA_CHUNK_ELEMS = 1 << 24  # 64 MB of fp32 per input: keeps a GPU busy; the few staging buffers stay small
# A whole-tensor (non-row-wise) merge whose fp32 inputs exceed this runs alone, with all cores and
# nothing else in memory beside it, instead of as one task among others.
ALONE_BYTES = 64 << 20


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


def _all_finite(t: torch.Tensor) -> bool:
    if t.dtype in FP8_DTYPES:
        t = t.to(torch.float16)
    return bool(torch.isfinite(t).all())


def _has_nan(t: torch.Tensor) -> bool:
    if t.dtype in FP8_DTYPES:
        t = t.to(torch.float16)
    return bool(torch.isnan(t).any())


def _sum_is_finite(t: torch.Tensor) -> bool:
    """A cheap test that `t` holds only finite values: NaN/Inf propagate into its sum. A sum beyond the
    dtype's range fails it too, so a failure is confirmed with `_all_finite`. Checking the block as
    written (after the cast) also catches the cast's overflow (1e5 is inf in fp16); measured ~3% of the
    compute, where an isfinite pass over each block added ~8%."""
    return math.isfinite(float(t.sum()))


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
    if probe.dtype in FP8_DTYPES:
        probe = probe.to(torch.float16)
    if not _sum_is_finite(probe) and not _all_finite(stored):
        result.nonfinite = True
        result.nan = _has_nan(stored)


class _MergeContext:
    """What every task of one merge shares: the plan, device, dtype, writer and per-thread buffers."""

    def __init__(self, plan: MergePlan, dev: torch.device, out_dtype: torch.dtype | None, chunk: int,
                 sample_every: int, writer: StreamingWriter | None, layout: OutputLayout | None = None):
        self.plan = plan
        self.layout = layout
        self.dev = dev
        self.out_dtype = out_dtype
        self.chunk = chunk
        self.sample_every = sample_every
        self.writer = writer
        self.buffers = WorkerBuffers()

    def inputs(self, kp: KeyPlan) -> list[torch.Tensor]:
        """The key's input tensors (memory-mapped views; read on the calling thread, so sources need not
        be thread-safe)."""
        return [self.plan.sources[i].get(raw) for i, raw in kp.reads]

    def decoded_and_large(self, kp: KeyPlan) -> bool:
        """Whether a key's inputs come decoded (quantized files: fresh fp32 memory, not mapped pages) and
        are large enough that only one such key should be in flight at a time."""
        return kp.numel * 4 * len(kp.reads) > ALONE_BYTES and any(
            getattr(self.plan.sources[i], "encoding", lambda _: None)(raw) is not None for i, raw in kp.reads)

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

    def rows_task(self, kp: KeyPlan, full: list[torch.Tensor], r0: int, r1: int, step: int) -> _TaskResult:
        """Merge rows [r0, r1) of a key block by block into this thread's staging buffer, then write them."""
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
            xs = []
            for i, t in enumerate(full):
                block = t.rows(b0, b1, self.dev) if isinstance(t, ScaledRows) else t[b0:b1]
                if isinstance(t, ScaledRows):
                    xs.append(block)  # decoded rows are a fresh fp32 tensor: any method may use them as scratch
                elif on_cpu and block.dtype == torch.float32 and inplace is None:
                    xs.append(block)  # methods never write their inputs: the mapped file is read in place
                elif on_cpu:
                    xs.append(self.buffers.get(f"in{i}", n, torch.float32).view(shape).copy_(block))
                else:
                    xs.append(block.to(self.dev, torch.float32))  # a fresh copy on the device
            sampled = self.sample_every > 0 and (b0 // step) % self.sample_every == 0
            # the report's sums need the inputs intact: sampled blocks take the pure function (same bits)
            y = (fn if sampled or inplace is None else inplace)(xs, weights, **params)
            dst = staging[(b0 - r0) * cols:(b1 - r0) * cols].view(shape)
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

    def encode_rows_task(self, kp: KeyPlan, full: list, y: torch.Tensor, r0: int, r1: int, step: int) -> _TaskResult:
        """Merge rows [r0, r1) of a key written encoded into its fp32 result buffer `y`, noting their amax
        (the key is quantized once every row is in: `finish_encoded`)."""
        fn, weights, params = self.method_args(kp)
        inplace = METHODS[kp.method].inplace
        cols = kp.numel // kp.shape[0]
        result = _TaskResult([])
        for b0 in range(r0, r1, step):
            b1 = min(r1, b0 + step)
            shape = (b1 - b0, *kp.shape[1:])
            xs = []
            for i, t in enumerate(full):
                block = t.rows(b0, b1, self.dev) if isinstance(t, ScaledRows) else t[b0:b1]
                if self.dev.type != "cpu":
                    xs.append(block.to(self.dev, torch.float32))
                elif block.dtype == torch.float32 and (inplace is None or isinstance(t, ScaledRows)):
                    xs.append(block)  # decoded rows are fresh: an in-place method may use them as scratch
                else:
                    xs.append(self.buffers.get(f"in{i}", (b1 - b0) * cols, torch.float32).view(shape).copy_(block))
            sampled = self.sample_every > 0 and (b0 // step) % self.sample_every == 0
            yb = (fn if sampled or inplace is None else inplace)(xs, weights, **params)
            result.amax = max(result.amax, _note_amax(yb, result))
            if sampled:
                result.sums.append(_block_sums(xs, yb))
            else:
                result.unsampled = True
            y[b0 * cols:b1 * cols].view(shape).copy_(yb)
        return result

    def finish_encoded(self, ko: KeyOutput, y: torch.Tensor, results: list[_TaskResult]) -> None:
        """Quantize a key's whole fp32 result with the fresh scale amax / fp8 max and write payload + scale,
        block by block in place (no second fp32 copy of the tensor)."""
        assert ko.fmt is not None
        scale = fp8_scale(max((r.amax for r in results), default=0.0), ko.fmt.fp8)
        saturate = any(r.nonfinite for r in results)  # finite values divided by amax / max stay in range
        stage = torch.empty(min(y.numel(), 1 << 22), dtype=ko.fmt.fp8)
        for lo in range(0, y.numel(), stage.numel()):
            hi = min(y.numel(), lo + stage.numel())
            q = quantize_fp8(y[lo:hi], scale, ko.fmt.fp8, out=stage[:hi - lo], saturate=saturate, inplace=True)
            if self.writer is not None:
                self.writer.write_at(ko.key, lo, q)
        if self.writer is not None:
            self.writer.write(ko.scale_key, scale)

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
        self.finish_encoded(ko, y.reshape(-1).cpu(), [result])
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
            if not _sum_is_finite(cast.float() if want in FP8_DTYPES else cast) and not _all_finite(cast) \
                    and _all_finite(t):
                raise _overflow_error(kp, self.plan, want)
            t = cast
        if self.writer is not None and t.is_floating_point() and not _written_finite(t):
            raise _nonfinite_error(kp, self.plan, [self.plan.inputs[kp.reads[0][0]].label])
        if self.writer is not None:
            self.writer.write(kp.out_key, t)


STATS_MODES = ("sample", "full", "off")


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
        if not _all_finite(plan.sources[i].get(raw)):
            bad.append(plan.inputs[i].label)
            if policies[i] == "error":
                raise BadFileError(f"{plan.sources[i].name}: tensor {raw!r} contains NaN or Inf values (the file is "
                                   "corrupt or the model diverged); download the file again, or leave the key out "
                                   f"of the merge with a rule such as '{re.escape(kp.name)}=take:A' or "
                                   f"'{re.escape(kp.name)}=drop'")
    return bad


def _written_finite(t: torch.Tensor) -> bool:
    return _sum_is_finite(t.to(torch.float16) if t.dtype in FP8_DTYPES else t) or _all_finite(t)


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
    choice = parse_output(torch.float32 if gguf_type else dtype)
    out_dtype = choice.dtype
    layout = output_layout(plan, choice)
    dev = resolve_device(device or "cpu")
    chunk = chunk_elems or (CUDA_CHUNK_ELEMS if dev.type == "cuda" else CPU_CHUNK_ELEMS)
    progress = progress or no_progress
    key_plans = plan.keys
    total = len(key_plans)
    key_stats: list[KeyStats] = []
    writer = None
    if out_path is not None:
        make = partial(GGUFStreamWriter, qtype=gguf_type) if gguf_type else StreamingWriter
        writer = make(out_path, layout.writer_plan(), layout.metadata(stamp_merge(plan, out_path)), protect=plan.protect_paths(),
                      overwrite=overwrite)
    # Inputs are not scanned for NaN/Inf up front (a full extra pass over every tensor): a non-finite
    # input shows in the merged output, which is checked for free, and only then are its inputs scanned.
    policies = [getattr(s, "nonfinite", "report") for s in plan.sources]
    ctx = _MergeContext(plan, dev, out_dtype, chunk, sample_every, writer, layout)
    t0 = time.perf_counter()
    progress(0, total)
    progress_step = max(1, total // 1000)  # 10^5 tiny keys need not make 10^5 progress (and UI) updates

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
            done = len(key_stats)
            if done == total or done % progress_step == 0:
                progress(done, total)
        return finish

    for s in plan.sources:
        s.nonfinite = "ignore"
    workers = threads or default_workers(dev)
    try:
        with torch.no_grad():  # MODEL weights are Parameters; nothing here needs autograd
            if writer is not None:
                writer.__enter__()
            try:
                if writer is not None:
                    layout.write_extras(writer)
                with KeyPipeline(workers, single_threaded_torch=dev.type == "cpu") as pipe:
                    labels: dict[tuple[int, ...], list[str]] = {}  # one list per combination of inputs read
                    for kp in key_plans:
                        which = tuple(i for i, _ in kp.reads)
                        reads = labels.get(which)
                        if reads is None:
                            reads = labels[which] = [plan.inputs[i].label for i in which]
                        ks = KeyStats(kp.name, kp.group, kp.action, kp.method, kp.numel, reads=reads,
                                      decided_by=kp.decided_by)
                        finish = finisher(kp, ks)
                        if kp.action in ("take", "merge") and ctx.decoded_and_large(kp):
                            pipe.drain()
                        ko = layout.keys.get(kp.out_key)
                        if ko is not None and ko.fmt is not None and kp.action == "take":
                            pipe.add([partial(ctx.encode_take, ko, ctx.inputs(kp)[0])], finish)
                        elif ko is not None and ko.fmt is not None and kp.action == "merge" and ctx.blockwise(kp):
                            # row blocks into one fp32 result; quantized when all are in (amax of the whole)
                            full = ctx.row_inputs(kp)
                            cols = kp.numel // kp.shape[0]
                            step = max(1, chunk // cols)
                            y = torch.empty(kp.numel, dtype=torch.float32)
                            pipe.add([partial(ctx.encode_rows_task, kp, full, y, r0, r1, step)
                                      for r0, r1 in row_ranges(kp.shape[0], cols, step, max(chunk, TASK_ELEMS))],
                                     _then(partial(ctx.finish_encoded, ko, y), finish))
                        elif ko is not None and ko.fmt is not None and kp.action == "merge":
                            task = partial(ctx.encoded_task, kp, ko, ctx.inputs(kp))
                            if kp.numel * 4 * len(kp.reads) > ALONE_BYTES:  # big: alone, with all cores
                                finish([pipe.run_alone(task)])
                            else:
                                pipe.add([task], finish)
                        elif kp.action == "take":
                            pipe.add([partial(ctx.take_task, kp, ctx.inputs(kp)[0])], finish)
                        elif kp.action != "merge":
                            finish([])
                        elif ctx.blockwise(kp):
                            full = ctx.row_inputs(kp)
                            cols = kp.numel // kp.shape[0]
                            step = max(1, chunk // cols)
                            pipe.add([partial(ctx.rows_task, kp, full, r0, r1, step)
                                      for r0, r1 in row_ranges(kp.shape[0], cols, step, max(chunk, TASK_ELEMS))], finish)
                            del full  # decoded inputs are freed with the key's last task, not at the next key
                        elif kp.numel * 4 * len(kp.reads) > ALONE_BYTES:
                            finish([pipe.run_alone(partial(ctx.whole_task, kp, ctx.inputs(kp)))])
                        else:
                            pipe.add([partial(ctx.whole_task, kp, ctx.inputs(kp))], finish)
            except BaseException as e:
                if writer is not None:
                    writer.__exit__(type(e), e, e.__traceback__)
                raise
            if writer is not None:
                writer.__exit__(None, None, None)
    finally:
        for s, pol in zip(plan.sources, policies):
            s.nonfinite = pol
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
