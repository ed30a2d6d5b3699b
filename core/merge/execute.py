"""Executing a merge plan: key by key, reading only the tensors each key needs, fp32 math on the chosen
device, one cast at the end, written through the streaming writer (atomic: no partial file ever).

Peak memory follows the largest tensor, never the model: inputs are memory-mapped, and methods whose
rows are independent (`chunkable`) get a tensor in row blocks of about 128K elements, so their
fp32 temporaries stay in cache and only the output tensor (in the output dtype) is held whole.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from ..devices import resolve_device
from ..dtypes import FP8_DTYPES, cast_for_output, dtype_name, parse_dtype
from ..errors import BadFileError, WeightsmithError
from ..progress import ProgressFn, no_progress
from ..safetensors_io import StreamingWriter
from .methods import METHODS, derive_seed
from .plan import KeyPlan, MergePlan, plan_merge
from .report import KeyStats, MergeReport

CPU_CHUNK_ELEMS = 1 << 17  # 512 KB of fp32 per input: a block and its temporaries stay in L2 (measured fastest)
CUDA_CHUNK_ELEMS = 1 << 26


@contextmanager
def _single_thread(active: bool):
    """Row blocks are too small to split across threads: on a busy machine the per-op thread hand-off
    costs more than the work (measured 10x slower with 2 threads than with 1 on 1M-element blocks)."""
    if not active:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def _stored_is_finite(stored: torch.Tensor, y: torch.Tensor) -> bool:
    """A cheap test that a block as written (`stored`, in the output dtype) holds only finite values:
    NaN/Inf propagate into its sum, whether they came from the fp32 result `y` or from the cast (1e5 is
    inf in fp16). Measured on a fp16 merge: ~3% more compute than summing `y` (which misses the cast's
    overflow), where an isfinite pass over each cast block added ~8%. A sum beyond the dtype's range
    fails it too: callers confirm a failure with `_all_finite`. fp8 has no sum kernel and saturates on
    the cast (cast_for_output), so there `y` is checked."""
    t = y if stored.dtype in FP8_DTYPES else stored
    return math.isfinite(float(t.sum()))


class _Accumulator:
    """The report's sums over the blocks of one key: |xᵢ|², x_A·xᵢ and |y − x_A|² (as Python floats, i.e.
    float64, added in block order so the result does not depend on thread timing), and whether some
    block may store NaN/Inf in the output dtype (`suspect`, from `_stored_is_finite`)."""

    def __init__(self, n: int):
        self.sq = [0.0] * n
        self.dot = [0.0] * n
        self.change = 0.0
        self.suspect = False
        self.sampled = False

    @staticmethod
    def partial(xs: list[torch.Tensor], y: torch.Tensor, stored: torch.Tensor, sums: bool) -> tuple:
        """The sums of one block: `y` the fp32 result, `stored` the block as written."""
        suspect = not _stored_is_finite(stored, y)
        if not sums:
            return None, None, None, suspect
        a = xs[0].reshape(-1)
        sq, dot = [], [0.0]
        vecdot = torch.linalg.vecdot  # measured faster than torch.dot on one thread
        for i, x in enumerate(xs):
            f = x.reshape(-1)
            sq.append(float(vecdot(f, f)))
            if i:
                dot.append(float(vecdot(a, f)))
        d = y.reshape(-1) - a
        change = float(vecdot(d, d))
        return sq, dot, change, suspect

    def add(self, part: tuple) -> None:
        sq, dot, change, suspect = part
        self.suspect = self.suspect or suspect
        if sq is None:
            self.sampled = True
            return
        for i in range(len(self.sq)):
            self.sq[i] += sq[i]
            self.dot[i] += dot[i]
        self.change += change


def _blockwise(kp: KeyPlan, chunk: int) -> bool:
    """Whether a merged key is processed in row blocks (into a reusable output buffer)."""
    return METHODS[kp.method].chunkable and len(kp.shape) >= 2 and kp.numel > chunk and kp.shape[0] > 1


class _OutputBuffers:
    """Two reusable output buffers, used alternately: while one is being written (write-behind), the next
    key is computed into the other. Reusing them spares the page faults of a fresh allocation per key
    (measured: a quarter of the compute time)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._bufs: list[torch.Tensor] = []
        self._turn = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if len(self._bufs) < 2:
            self._bufs.append(torch.empty(self.nbytes, dtype=torch.uint8))
        buf = self._bufs[self._turn]
        self._turn ^= 1
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return buf[:n].view(dtype).view(shape)


def _merge_tensor(kp: KeyPlan, plan: MergePlan, dev: torch.device, out_dtype: torch.dtype, chunk: int,
                  acc: _Accumulator, sample_every: int, pool: ThreadPoolExecutor | None,
                  buffers: _OutputBuffers) -> torch.Tensor:
    method = METHODS[kp.method]
    params = dict(kp.params)
    if method.random:
        params["seed"] = derive_seed(params.get("seed", 0), kp.name)
    full = [plan.sources[i].get(raw) for i, raw in kp.reads]
    weights = list(kp.weights)
    numel = kp.numel
    if _blockwise(kp, chunk):
        rows = kp.shape[0]
        step = max(1, chunk // max(1, numel // rows))
        out = buffers.take(kp.shape, out_dtype)

        # grad and inference modes are per thread: the workers take the caller's (ComfyUI runs nodes
        # under inference_mode, and `out` is then an inference tensor only inference mode may write)
        inference = torch.is_inference_mode_enabled()

        def block(index: int):
            with torch.inference_mode(inference), torch.no_grad():
                r0 = index * step
                xs = [t[r0:r0 + step].to(dev, torch.float32) for t in full]
                y = method.fn(xs, weights, **params)
                dst = out[r0:r0 + step]
                _store(dst, y.cpu() if y.device.type != "cpu" else y)
                return _Accumulator.partial(xs, y, dst, sample_every > 0 and index % sample_every == 0)

        blocks = range((rows + step - 1) // step)
        with _single_thread(dev.type == "cpu"):
            parts = list(pool.map(block, blocks)) if pool is not None else [block(i) for i in blocks]
        for part in parts:
            acc.add(part)
        return out
    xs = [t.to(dev, torch.float32) for t in full]
    y = method.fn(xs, weights, **params)
    if tuple(y.shape) != kp.shape:
        raise WeightsmithError(f"{kp.name!r}: method {kp.method} returned shape {list(y.shape)}, expected {list(kp.shape)}")
    out = cast_for_output(y, out_dtype)
    acc.add(_Accumulator.partial(xs, y, out, sample_every > 0))
    return out.cpu()


class _WriteBehind:
    """Writes the previous tensor in a thread while the next one is computed: the write (a copy into
    the page cache, GIL released) and the math overlap on two cores. At most one tensor waits, so memory
    holds the tensor being written plus the one being computed."""

    def __init__(self, write):
        self._write = write
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, name="weightsmith-merge-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if self._error is None and not self._abort:
                    self._write(*item)
            except BaseException as e:  # handed to the main thread at its next call
                self._error = e
            finally:
                self._q.task_done()

    def __call__(self, key: str, tensor: torch.Tensor) -> None:
        self._q.join()  # the previous tensor is on disk (or failed) before the next is handed over
        if self._error is not None:
            raise self._error
        self._q.put((key, tensor))

    def close(self, abort: bool = False) -> None:
        self._abort = abort
        self._q.put(None)
        self._thread.join()
        if self._error is not None and not abort:
            raise self._error


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
    for row blocks on the CPU (default: one less than torch's thread count, at most 4)."""
    if stats is True or stats is False:
        stats = "sample" if stats else "off"
    if stats not in STATS_MODES:
        raise WeightsmithError(f"stats mode {stats!r}: choose one of {', '.join(STATS_MODES)}")
    sample_every = {"full": 1, "sample": STATS_SAMPLE_EVERY, "off": 0}[stats]
    out_dtype = parse_dtype(dtype)
    dev = resolve_device(device or "cpu")
    chunk = chunk_elems or (CUDA_CHUNK_ELEMS if dev.type == "cuda" else CPU_CHUNK_ELEMS)
    progress = progress or no_progress
    key_plans = plan.keys
    total = len(key_plans)
    key_stats: list[KeyStats] = []
    writer = None
    if out_path is not None:
        layout = {kp.out_key: (kp.shape, output_dtype(kp, out_dtype)) for kp in plan.output_keys()}
        writer = StreamingWriter(out_path, layout, plan.metadata, protect=plan.protect_paths(), overwrite=overwrite)
    # Inputs are not scanned for NaN/Inf up front (a full extra pass over every tensor): a non-finite
    # input shows in the merged output, which is checked for free, and only then are its inputs scanned.
    policies = [getattr(s, "nonfinite", "report") for s in plan.sources]
    # Row blocks go to worker threads, each running torch single-threaded; one core is left to the
    # write-behind thread (on 2 cores, one worker measured 1.5x faster than two).
    if dev.type != "cpu":
        workers = 1
    else:
        workers = threads or max(1, min(torch.get_num_threads(), os.cpu_count() or 1, 5) - 1)
    buffers = _OutputBuffers(max((kp.numel * output_dtype(kp, out_dtype).itemsize for kp in key_plans
                                  if kp.action == "merge" and _blockwise(kp, chunk)), default=0))
    t0 = time.perf_counter()
    progress(0, total)

    def run(write, pool) -> None:
        for done, kp in enumerate(key_plans, 1):
            ks = KeyStats(kp.name, kp.group, kp.action, kp.method, kp.numel,
                          reads=[plan.inputs[i].label for i, _ in kp.reads], decided_by=kp.decided_by)
            if kp.action == "take":
                i, raw = kp.reads[0]
                t = plan.sources[i].get(raw)
                want = output_dtype(kp, out_dtype)
                if t.dtype != want:
                    cast = cast_for_output(t.float(), want)
                    # a narrower dtype can turn finite values into inf; the input's own NaN/Inf are copied
                    if not _stored_is_finite(cast, t) and not _all_finite(cast) and _all_finite(t):
                        raise _overflow_error(kp, plan, want)
                    t = cast
                if write is not None:
                    write(kp.out_key, t)
            elif kp.action == "merge":
                acc = _Accumulator(len(kp.reads))
                want = output_dtype(kp, out_dtype)
                out = _merge_tensor(kp, plan, dev, want, chunk, acc, sample_every, pool, buffers)
                if sample_every:
                    ks.sq, ks.dot, ks.change, ks.sampled = acc.sq, acc.dot, acc.change, acc.sampled
                # Finiteness is judged on the values as written (after the cast), checked exactly only
                # when a block's sum raised the suspicion. NaN/Inf that come from the inputs (or a NaN the
                # method made) are reported with the inputs that hold them; ±inf from finite inputs is an
                # overflow of the output dtype (or of fp32): refused, since the user can widen the dtype.
                if acc.suspect and not _all_finite(out):
                    bad_inputs = _check_inputs_finite(plan, kp, policies)
                    if not bad_inputs and not _has_nan(out):
                        raise _overflow_error(kp, plan, want)
                    ks.finite = False
                    ks.nonfinite_inputs = bad_inputs
                if write is not None:
                    write(kp.out_key, out)
                del out
            key_stats.append(ks)
            progress(done, total)

    for s in plan.sources:
        s.nonfinite = "ignore"
    pool = ThreadPoolExecutor(workers, thread_name_prefix="weightsmith-merge", initializer=torch.set_num_threads,
                              initargs=(1,)) if workers > 1 else None
    try:
        with torch.no_grad():  # MODEL weights are Parameters; nothing here needs autograd
            if writer is not None:
                with writer as w:
                    behind = _WriteBehind(w.write)
                    try:
                        run(behind, pool)
                    except BaseException:
                        behind.close(abort=True)
                        raise
                    behind.close()
            else:
                run(None, pool)
    finally:
        for s, pol in zip(plan.sources, policies):
            s.nonfinite = pol
        if pool is not None:
            pool.shutdown(wait=True)
    seconds = time.perf_counter() - t0
    return MergeReport(
        plan=plan,
        out_path=Path(out_path) if out_path is not None else None,
        dtype="keep" if out_dtype is None else str(out_dtype).replace("torch.", ""),
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
