"""The compute device of a command, checked before any work: a missing GPU is a clear error at once,
not a torch traceback after minutes of reading."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import WeightsmithError


def resolve_device(device: str | torch.device) -> torch.device:
    """The compute device, checked before any work: a missing GPU is a clear error, not a torch traceback."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise WeightsmithError(f"unknown device {device!r} ({e}); give cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightsmithError(f"device {device} requested but no CUDA GPU is available here; use device cpu "
                                   "(--device cpu)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise WeightsmithError(f"device {device} does not exist: this machine has {count} CUDA GPU(s) "
                                   f"(cuda:0 to cuda:{count - 1}); choose one of them, or use cpu")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as e:
            raise WeightsmithError(f"device {device} is not usable here ({e}); use device cpu or cuda") from None
    return dev


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block on one CPU thread (process-wide, restored after), for work that gains little from
    threads and suffers from them on a busy machine, where every OpenMP barrier waits for a descheduled
    worker. Measured here under load: a 3072×128 QR took 0.9 s with 2 threads and 0.01 s with 1, a
    128×128 SVD 0.35 s vs 0.02 s; 26 bf16 copy+scale+min/max passes (3 MB each) 500 ms vs 50 ms."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
