"""Pre-run estimates: output size, free disk, peak RAM, VRAM and time of a command, before any work.

A command describes its work as a list of `KeyWork` items (one per output tensor or layer: bytes read,
bytes written, elementwise passes, GEMM flops, the fp32 working set of the item) built from its plan,
from headers only (`estimate_work.py` has the builders). The time is that work divided by speeds
measured on this machine (`calibration.py`): read speed of the inputs, single-thread elementwise speed
(the streaming engines run torch single-threaded on one worker per core) and GEMM speed on the device.
Peak RAM is the largest item's working set times the pipeline depth (how many items the engine holds at
once), plus what the command keeps whole (an extracted or composed LoRA lives in memory until saved);
memory-mapped input pages are not counted (the kernel drops them under pressure).

`Estimate.check_disk()` refuses a run whose output does not fit on its filesystem, naming both numbers,
before anything is read or written.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .calibration import Calibration, calibrate, read_speed
from .errors import OutputPathError
from .lora.budget import format_size

# Slack for what a formula does not see: allocator caching, the report's per-key records, torch's own
# per-thread pools (bench/bench_merge.py: a merge adds ~25 MB of RssAnon, ~10 MB of it its buffers).
BASE_OVERHEAD = 14 << 20
DISK_MARGIN = 1 << 20  # the header, metadata and filesystem blocks around the tensor bytes


class DiskSpaceError(OutputPathError):
    """The output would not fit on its filesystem: refused before any work."""


@dataclass
class KeyWork:
    """The work of one output tensor (or one extracted layer)."""

    read_bytes: int = 0  # bytes of the inputs read
    write_bytes: int = 0  # bytes written to the output
    elem_passes: float = 0.0  # fp32 elementwise passes (element-operations) on the CPU or device
    flops: float = 0.0  # GEMM / factorisation flops
    working_bytes: int = 0  # RAM (or VRAM) the item needs while it is worked on


@dataclass
class Estimate:
    operation: str
    device: str
    output: Path | None
    output_bytes: int
    peak_ram: int
    vram: int | None  # None on the CPU
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)  # seconds: read, compute, write
    free_bytes: int | None = None
    output_is_bound: bool = False  # the size is an upper bound (adaptive ranks)
    notes: list[str] = field(default_factory=list)

    def check_disk(self) -> None:
        """Refuse (DiskSpaceError, before any work) an output that does not fit on its filesystem."""
        if self.output is None or self.free_bytes is None:
            return
        need = self.output_bytes + DISK_MARGIN
        if need > self.free_bytes:
            where = _existing_parent(self.output)
            raise DiskSpaceError(
                f"{self.output}: the output needs about {format_size(need)} but only {format_size(self.free_bytes)} "
                f"is free on the filesystem of {where}; free {format_size(need - self.free_bytes)} or more, or write "
                "to another disk. Nothing was read or written")

    def text(self) -> str:
        size = ("at most " if self.output_is_bound else "") + format_size(self.output_bytes)
        disk = f", free disk {format_size(self.free_bytes)}" if self.free_bytes is not None else ""
        vram = f", VRAM {format_size(self.vram)} on {self.device}" if self.vram is not None else ""
        parts = ", ".join(f"{k} {_duration(v)}" for k, v in self.parts.items() if v >= 0.05)
        line = (f"estimate ({self.operation}): output {size}{disk}; peak RAM {format_size(self.peak_ram)}{vram}; "
                f"time ~{_duration(self.seconds)}" + (f" ({parts})" if parts else ""))
        return "\n".join([line, *[f"  note: {n}" for n in self.notes]])

    def to_dict(self) -> dict:
        return {"operation": self.operation, "device": self.device,
                "output": str(self.output) if self.output else None, "output_bytes": self.output_bytes,
                "output_is_bound": self.output_is_bound, "free_bytes": self.free_bytes, "peak_ram": self.peak_ram,
                "vram": self.vram, "seconds": round(self.seconds, 3),
                "parts": {k: round(v, 3) for k, v in self.parts.items()}, "notes": self.notes}


def _duration(s: float) -> str:
    if s < 1:
        return f"{s:.2f} s"
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _existing_parent(path: Path) -> Path:
    p = Path(os.path.abspath(path)).parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_disk_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the filesystem that will hold `path` (its nearest existing folder)."""
    return shutil.disk_usage(_existing_parent(Path(path))).free


def estimate(operation: str, work: list[KeyWork], device, output: str | os.PathLike | None, *,
             inputs: list[Path] | None = None, workers: int = 1, depth: int = 1, held_bytes: int = 0,
             output_bytes: int | None = None, output_is_bound: bool = False, notes: list[str] | None = None,
             calibration: Calibration | None = None) -> Estimate:
    """The estimate of `work` run on `device` by `workers` threads holding up to `depth` items at once,
    keeping `held_bytes` whole (a LoRA built in memory); `output_bytes` defaults to Σ write_bytes."""
    import torch

    dev = torch.device(device)
    cal = calibration or calibrate(dev)
    read_rate = min((read_speed(p) for p in inputs or []), default=cal.read_bps)
    read_bytes = sum(w.read_bytes for w in work)
    write_bytes = sum(w.write_bytes for w in work)
    lanes = max(1, workers) if dev.type == "cpu" else 1
    elem_rate = cal.elementwise_per_s * (lanes if dev.type == "cpu" else 1)
    compute = sum(w.elem_passes for w in work) / elem_rate + sum(w.flops for w in work) / cal.gemm_flops
    parts = {"read": read_bytes / read_rate, "compute": compute, "write": write_bytes / cal.write_bps}
    seconds = sum(parts.values())
    largest = max((w.working_bytes for w in work), default=0)
    working = largest * max(1, depth)
    on_device = dev.type != "cpu"
    peak = BASE_OVERHEAD + held_bytes + (0 if on_device else working)
    if on_device:  # the CPU still stages what goes to and from the device
        peak += largest
    out = Path(output) if output is not None else None
    size = output_bytes if output_bytes is not None else write_bytes
    return Estimate(operation, str(dev), out, int(size), int(peak), int(working) if on_device else None, seconds,
                    parts, free_disk_bytes(out) if out is not None else None, output_is_bound, list(notes or []))


def svd_flops(m: int, n: int, rank: int, method: str, power_iterations: int = 2) -> float:
    """Flops of a rank-`rank` factorisation of an m×n matrix: the randomized range finder's GEMMs
    (2 + 2·power_iterations products of width q, and the projection) or an exact SVD (~14·m·n·k)."""
    k = min(m, n)
    if method == "exact":
        return 14.0 * m * n * k
    q = min(k, rank + max(10, rank // 2))
    return 2.0 * m * n * q * (2 + 2 * power_iterations) + 4.0 * (m + n) * q * q


def fmt_bytes(n: float) -> str:
    return format_size(n) if math.isfinite(n) else "?"
