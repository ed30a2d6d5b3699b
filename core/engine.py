"""One streaming engine for merge, lossless mix and bake: plan per output key which inputs and which
function, then stream the keys' tasks through the worker pipeline into the writer.

The three front ends differ only in what a key computes (a merge method, the lossless pick, the adapters'
ΔW added to a weight) and in what they report. Everything else is here, once:

* `run_keys` — the loop. Each front end hands over its keys in output order as `KeyJob`s (a generator:
  inputs are read on the calling thread as the loop advances, so sources need not be thread-safe); the
  tasks run on the worker threads (pipeline.KeyPipeline), each key's `finish` runs on this thread in key
  order; progress is reported as keys finish (throttled for models of 10^5 keys) and an interrupt raised
  by the progress callback stops the run like any error: queued tasks are cancelled, running ones
  awaited, the writer aborts (its temp file is removed: no partial file ever), and the sources' NaN/Inf
  policies are restored.
* The finiteness checks and the dtype policy every front end applies to what it writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .dtypes import FP8_DTYPES, fp8_nonfinite
from .dtypes import all_finite as dtypes_all_finite
from .pipeline import KeyPipeline, default_workers
from .progress import ProgressFn, no_progress


@dataclass(frozen=True, slots=True)
class OutputKey:
    """The one planner shape every front end's plan can be read as (`plan.output_specs()`): an output key,
    which inputs it reads and which function makes it. `dtype` is the dtype the plan gives the key (merge
    and bake: the input's, before any output dtype chosen at execution; mix: its chosen output dtype)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    reads: tuple[tuple[int, str], ...]  # (input index, raw key in that input), in input order
    function: str  # "copy", a merge method ("weighted_sum", "lossless_min", …) or "bake"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def largest(keys: Iterable[OutputKey]) -> OutputKey | None:
    """The output key with the most bytes (what bounds an executor's working memory)."""
    return max(keys, key=lambda k: k.nbytes, default=None)


@dataclass
class KeyJob:
    """One output key's work. `tasks` run on the worker threads (results in task order go to `finish`, on
    the calling thread, in key order); `alone`, when set, is one big whole-tensor computation run after
    the queue drains, with all cores and nothing else in memory (its result is `finish`'s one result);
    `drain` first empties the queue (a key whose inputs come decoded into fresh memory: one at a time);
    `then(results)`, when set, returns a second list of tasks that start on the workers as soon as the
    first ones are done (a key quantized once the amax of all its rows is known), before `finish`."""

    tasks: list[Callable[[], Any]] = field(default_factory=list)
    finish: Callable[[list], None] | None = None
    then: Callable[[list], Sequence[Callable[[], Any]]] | None = None
    alone: Callable[[], Any] | None = None
    drain: bool = False


def run_keys(
    jobs: Iterable[KeyJob],
    total: int,
    *,
    writer=None,
    sources: Sequence = (),
    device: torch.device = torch.device("cpu"),
    threads: int | None = None,
    progress: ProgressFn | None = None,
    before: Callable[[Any], None] | None = None,
) -> None:
    """Run `jobs` (`total` of them, for progress) and close `writer` (a StreamingWriter or GGUF writer, not
    yet entered; None on a dry run): committed when every key finished, aborted on any exception.
    `before(writer)` writes what precedes the keys (an encoding's extra tensors). While the run lasts the
    sources read without their per-read NaN/Inf scan (a full extra pass over every input): each front end
    checks what it writes instead, and scans the inputs only when an output is not finite."""
    progress = progress or no_progress
    step = max(1, total // 1000)  # 10^5 tiny keys need not make 10^5 progress (and UI) updates
    done = 0
    policies = [getattr(s, "nonfinite", "report") for s in sources]
    for s in sources:
        s.nonfinite = "ignore"

    def finished(job: KeyJob):
        def finish(results: list) -> None:
            nonlocal done
            if job.finish is not None:
                job.finish(results)
            done += 1
            if done == total or done % step == 0:
                progress(done, total)
        return finish

    try:
        with torch.no_grad():  # MODEL weights are Parameters; nothing here needs autograd
            if writer is not None:
                writer.__enter__()
            try:
                if writer is not None and before is not None:
                    before(writer)
                if total:
                    progress(0, total)
                with KeyPipeline(threads or default_workers(device), single_threaded_torch=device.type == "cpu") as pipe:
                    for job in jobs:
                        if job.drain:
                            pipe.drain()
                        if job.alone is not None:
                            finished(job)([pipe.run_alone(job.alone)])
                        else:  # a key with no task still finishes in key order, after those before it
                            pipe.add(job.tasks, finished(job), then=job.then)
            except BaseException as e:
                if writer is not None:
                    writer.__exit__(type(e), e, e.__traceback__)
                raise
            if writer is not None:
                writer.__exit__(None, None, None)
    finally:
        for s, pol in zip(sources, policies):
            s.nonfinite = pol


# ---------------------------------------------------------------------------------------------------
# Finiteness: judged on the values as written, cheaply (a sum), confirmed exactly only when it fails


def sum_is_finite(t: torch.Tensor) -> bool:
    """A cheap test that `t` holds only finite values: NaN/Inf propagate into its sum. A sum beyond the
    dtype's range fails it too, so a failure is confirmed with `all_finite`. Checking the block as
    written (after the cast) also catches the cast's overflow (1e5 is inf in fp16); measured ~3% of the
    compute, where an isfinite pass over each block added ~8%. fp8: its non-finite codes, from the bytes."""
    if t.dtype in FP8_DTYPES:
        return not fp8_nonfinite(t)
    return math.isfinite(float(t.sum()))


def all_finite(t: torch.Tensor) -> bool:
    """Every value of `t` is finite (exact)."""
    if t.dtype in FP8_DTYPES:
        return not fp8_nonfinite(t)
    return bool(torch.isfinite(t).all())


def has_nan(t: torch.Tensor) -> bool:
    if t.dtype in FP8_DTYPES:
        return fp8_nonfinite(t, nan_only=True)
    return bool(torch.isnan(t).any())


def written_finite(t: torch.Tensor) -> bool:
    """Every value of `t` is finite: the cheap sum first, the exact pass only when the sum is not finite
    (dtypes.all_finite, the same check every reader applies)."""
    return dtypes_all_finite(t)


def float_output_dtype(in_dtype: torch.dtype, want: torch.dtype | None) -> torch.dtype:
    """The dtype policy of every front end: `want` for float tensors (None: keep the input's dtype),
    non-float tensors always as they are."""
    return want if want is not None and in_dtype.is_floating_point else in_dtype
