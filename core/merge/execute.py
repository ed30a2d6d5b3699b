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
from ..dtypes import FP8_DTYPES, cast_for_output, dtype_name, parse_dtype
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
                 sample_every: int, writer: StreamingWriter | None):
        self.plan = plan
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
                block = t[b0:b1]
                if on_cpu and block.dtype == torch.float32 and inplace is None:
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

    `dtype` None keeps each key's input dtype; floats are computed in fp32 and cast once. `stats`: the
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
    out_dtype = torch.float32 if gguf_type else parse_dtype(dtype)
    dev = resolve_device(device or "cpu")
    chunk = chunk_elems or (CUDA_CHUNK_ELEMS if dev.type == "cuda" else CPU_CHUNK_ELEMS)
    progress = progress or no_progress
    key_plans = plan.keys
    total = len(key_plans)
    key_stats: list[KeyStats] = []
    writer = None
    if out_path is not None:
        layout = {kp.out_key: (kp.shape, output_dtype(kp, out_dtype)) for kp in plan.output_keys()}
        make = partial(GGUFStreamWriter, qtype=gguf_type) if gguf_type else StreamingWriter
        writer = make(out_path, layout, plan.metadata, protect=plan.protect_paths(), overwrite=overwrite)
    # Inputs are not scanned for NaN/Inf up front (a full extra pass over every tensor): a non-finite
    # input shows in the merged output, which is checked for free, and only then are its inputs scanned.
    policies = [getattr(s, "nonfinite", "report") for s in plan.sources]
    ctx = _MergeContext(plan, dev, out_dtype, chunk, sample_every, writer)
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
                        raise _overflow_error(kp, plan, output_dtype(kp, out_dtype))
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
                        if kp.action == "take":
                            pipe.add([partial(ctx.take_task, kp, ctx.inputs(kp)[0])], finish)
                        elif kp.action != "merge":
                            finish([])
                        elif ctx.blockwise(kp):
                            full = ctx.inputs(kp)
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
        dtype=dtype if gguf_type else "keep" if out_dtype is None else str(out_dtype).replace("torch.", ""),
        device=str(dev),
        seconds=seconds,
        bytes_written=writer.total_bytes if writer is not None else 0,
        key_stats=key_stats,
        stats=stats,
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
