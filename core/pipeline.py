"""Running per-key work on every core while the output file is written, shared by merge and mix.

A key's work is a list of tasks (for a tensor whose rows are independent: one task per range of rows).
Worker threads run the tasks; each computes into buffers of its own and writes its bytes straight to
their place in the output (`StreamingWriter.write_at`), so arithmetic and the copy into the page cache
run side by side on all cores, and no finished tensor waits in RAM for a writer thread. The caller hands
keys over in order; each key's `finish` runs on the calling thread, in key order, once all its tasks are
done (statistics, NaN checks, progress, interrupts). At most `max_in_flight` tasks are queued, so memory
holds a bounded number of row blocks whatever the model size.

torch ops release the GIL; each worker runs torch single-threaded (many small ops split across threads
cost more in hand-offs than they gain), and the parallelism comes from the tasks themselves.
"""

from __future__ import annotations

import gc
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch

TASK_ELEMS = 1 << 20  # elements per task: big enough that Python overhead is noise, small enough to balance


def default_workers(device: torch.device) -> int:
    """One worker per core: tasks also write, so no core is left to a writer thread (measured on 2 cores:
    2 workers beat 3, whose GIL hand-offs cost more than the overlap gained); a GPU is fed by two, one
    computing while the other copies its result back and writes it."""
    if device.type != "cpu":
        return 2
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1, 8))


def row_ranges(rows: int, cols: int, step: int, task_elems: int = TASK_ELEMS) -> list[tuple[int, int]]:
    """Rows [r0, r1) per task: whole multiples of `step` rows (the compute block) adding up to about
    `task_elems` elements."""
    per = max(step, (task_elems // max(1, cols)) // step * step)
    return [(r0, min(rows, r0 + per)) for r0 in range(0, rows, per)]


class WorkerBuffers:
    """Per-thread reusable buffers: reusing them spares the page faults and zeroing of fresh allocations
    (measured: a quarter of a merge's compute time)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, slot: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of `numel` elements of `dtype`, this thread's own under `slot` (grown as needed)."""
        bufs = self._local.__dict__.setdefault("bufs", {})
        nbytes = numel * dtype.itemsize
        buf = bufs.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = bufs[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype)


def _run(inference: bool, fn: Callable[[], Any]) -> Any:
    # grad and inference modes are per thread: workers take the caller's (ComfyUI runs nodes under
    # inference_mode, and an inference tensor may only be written inside it)
    with torch.inference_mode(inference), torch.no_grad():
        return fn()


class _SecondPhase:
    """A key's follow-up tasks (`then(results)` of its first tasks), started on the worker that finishes
    the last first task, so the cores never wait for the calling thread to hand them out (a key written
    fp8-scaled is quantized this way once its amax over all rows is known)."""

    def __init__(self, n: int, then: Callable[[list[Any]], Sequence[Callable[[], Any]]]):
        self.then = then
        self.left = n
        self.results: list[Any] = [None] * n
        self.failed = False
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.futures: list[Future] = []
        self.error: BaseException | None = None
        self.next: _SecondPhase | None = None

    def wrap(self, i: int, task: Callable[[], Any], pipe: KeyPipeline) -> Callable[[], Any]:
        def run() -> Any:
            try:
                r = self.results[i] = task()
            except BaseException:
                self.failed = True
                raise
            finally:
                with self.lock:
                    self.left -= 1
                    last = self.left == 0
                if last:
                    self._start(pipe)
            return r
        return run

    def _start(self, pipe: KeyPipeline) -> None:
        try:
            if not self.failed and not pipe.closing:
                assert pipe._pool is not None
                out = self.then(list(self.results))
                # (tasks, next then): a third phase and more, each started by the last task of the one before
                tasks, after = out if isinstance(out, tuple) else (out, None)
                if after is not None:
                    self.next = _SecondPhase(len(tasks), after)
                    tasks = [self.next.wrap(i, t, pipe) for i, t in enumerate(tasks)]
                self.futures = [pipe._pool.submit(_run, pipe._inference, t) for t in tasks]
                if self.next is not None and not tasks:
                    self.next._start(pipe)
        except BaseException as e:  # reported by the calling thread when it finishes the key
            self.error = e
        finally:
            self.started.set()

    def wait(self) -> None:
        """Wait for the follow-up tasks (after the first ones' futures are all done), and for the phases
        after them; re-raise their error."""
        self.started.wait()
        if self.error is not None:
            raise self.error
        for f in self.futures:
            f.result()
        if self.next is not None:
            self.next.wait()


class KeyPipeline:
    """Tasks of consecutive keys on a thread pool, finished in key order. Use as a context manager: on an
    exception no queued task starts and running ones are waited for before the caller closes the file."""

    def __init__(self, workers: int, max_in_flight: int | None = None, single_threaded_torch: bool = True):
        self.workers = max(1, workers)
        self.max_in_flight = max_in_flight or 2 * self.workers + 2
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[list[Future], Callable[[list[Any]], None], _SecondPhase | None]] = deque()
        self.closing = False
        self._in_flight = 0
        self._single = single_threaded_torch
        self._threads_before = torch.get_num_threads()
        self._inference = torch.is_inference_mode_enabled()
        self._gc_was_enabled = gc.isenabled()

    def __enter__(self) -> KeyPipeline:
        # The cyclic garbage collector, triggered by the many small objects of a block loop, walked the
        # whole heap (torch's modules included) often enough to take ~9% of a merge; the loop makes no
        # cycles, so it is paused for the run and the collector catches up afterwards.
        gc.disable()
        if self._single:
            torch.set_num_threads(1)  # process-wide: restored on exit
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="weightsmith-task")
        return self

    def add(self, tasks: Sequence[Callable[[], Any]], finish: Callable[[list[Any]], None],
            then: Callable[[list[Any]], Sequence[Callable[[], Any]]] | None = None) -> None:
        """Queue one key's tasks; `finish(results)` (results in task order) runs later on this thread.
        `then(results)`, when given, returns follow-up tasks that start as soon as the last task is done
        (on that worker), or (tasks, then2) for one more phase after those, and so on; `finish` runs after
        them all (with the first tasks' results)."""
        assert self._pool is not None, "KeyPipeline.add outside its with-block"
        second = _SecondPhase(len(tasks), then) if then is not None else None
        if second is not None:
            tasks = [second.wrap(i, t, self) for i, t in enumerate(tasks)]
        futures = [self._pool.submit(_run, self._inference, t) for t in tasks]
        if second is not None and not tasks:
            second._start(self)  # no first tasks: the follow-ups start now
        self._pending.append((futures, finish, second))
        self._in_flight += len(futures)
        while self._in_flight > self.max_in_flight and self._pending:
            self._finish_oldest()

    def run_alone(self, fn: Callable[[], Any]) -> Any:
        """Drain the queue, then run `fn` here with torch's own thread count: for one big whole-tensor
        computation (a non-row-wise method) that should neither share the cores nor multiply memory."""
        self.drain()
        if self._single:
            torch.set_num_threads(self._threads_before)
        try:
            return fn()
        finally:
            if self._single:
                torch.set_num_threads(1)

    def _finish_oldest(self) -> None:
        futures, finish, second = self._pending.popleft()
        self._in_flight -= len(futures)
        results = [f.result() for f in futures]
        if second is not None:
            second.wait()
        finish(results)

    def drain(self) -> None:
        while self._pending:
            self._finish_oldest()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            self.closing = True  # no follow-up tasks start from here on
            queued = [f for futures, _, _ in self._pending for f in futures]
            for f in queued:
                f.cancel()
            wait(queued)
            self._pending.clear()
            assert self._pool is not None
            self._pool.shutdown(wait=True, cancel_futures=True)
            if self._single:
                torch.set_num_threads(self._threads_before)
            if self._gc_was_enabled:
                gc.enable()
