"""Size-budgeted ranks: one file size for the whole LoRA, ranks allocated across layers to minimise the
total reconstruction error Σ‖ΔW_i − L_i‖²_F.

Keeping singular direction j of layer i removes σ_ij² from the total squared error and costs
(m_i + n_i) · bytes-per-element of file (one column of up, one row of down). Within a layer the gains
fall while the cost stays the same, so taking directions in order of σ²-per-byte across all layers,
while they fit, is the greedy solution of this knapsack; it is optimal for the fractional problem and
leaves at most one direction's worth of budget unused per layer. The best *uniform* rank that fits is
computed from the same spectra, and the allocation falls back to it in the (degenerate) cases where it
is better, so the result is never worse than a uniform rank of the same size.

Spectra come from randomized sketches (no full SVD of any layer): a sketch of width w gives the leading
w singular values (lower bounds, tight in practice: see svd.py). A layer whose allocation reaches its
sketch width — more of its spectrum might deserve bytes — is sketched again, twice as wide, until no
allocation is limited by a sketch (`widen`).

Sizes: `parse_size` reads "100MB", "1.5 GiB", "250k" (decimal units, binary with an i); the file's fixed
part (full diffs of 1-D weights and biases, alphas, the header) is counted before ranks get the rest.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from dataclasses import dataclass, field

import torch

from .svd import OptionError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
HEADER_SLACK = 64  # bytes: the header's padding and braces
METADATA_ALLOWANCE = 2048  # bytes reserved for the file's metadata (settings, summary, recipe, modelspec)


def parse_size(text: str | int | float) -> int:
    """Bytes from "100MB", "1.5GiB", "250k", "123456" (MB = 10^6 bytes, MiB = 2^20); OptionError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise OptionError(f"size {text!r}: give a number with a unit, e.g. 100MB, 1.5GB or 512MiB")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if not math.isfinite(value) or size <= 0:
        raise OptionError(f"size {text!r} must be a positive size, e.g. 100MB")
    return size


def format_size(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def tensor_header_bytes(key: str, shape: tuple[int, ...], file_size: int = 10**12) -> int:
    """The bytes a tensor's entry takes in a safetensors header (offsets as wide as `file_size`)."""
    entry = {key: {"dtype": "BF16", "shape": list(shape), "data_offsets": [file_size, file_size]}}
    return len(json.dumps(entry, separators=(",", ":"))) + 1  # and its comma


@dataclass
class LayerSpectrum:
    """What the allocation knows of one low-rank layer."""

    key: str
    rows: int  # m of the flattened [m, n] change
    cols: int
    cap: int  # the largest rank allowed (max_rank, min(m, n))
    total_sq: float  # ‖ΔW‖²_F
    singular_values: torch.Tensor  # the leading ones (fp64, CPU), ≥ what was allocated
    complete: bool = False  # the sketch covers the whole spectrum (width ≥ cap)
    overhead: int = 0  # bytes the layer costs once it has any rank (header entries, alpha)

    @property
    def width(self) -> int:
        return int(self.singular_values.numel())

    def bytes_per_rank(self, elem: int) -> int:
        return (self.rows + self.cols) * elem

    def error_sq(self, rank: int) -> float:
        """‖ΔW − best rank-r‖²_F as far as the sketch knows (an upper bound with randomized values)."""
        kept = float(self.singular_values[:rank].square().sum())
        return max(self.total_sq - kept, 0.0)


@dataclass
class Allocation:
    ranks: dict[str, int]
    rank_bytes: int  # bytes of factors at these ranks (with their header entries and alphas)
    error_sq: float  # Σ estimated residual² over the layers
    total_sq: float  # Σ ‖ΔW‖²
    uniform_rank: int  # the best uniform rank that fits the same bytes
    uniform_error_sq: float
    chose: str = "greedy"  # greedy | uniform
    limited: list[str] = field(default_factory=list)  # layers whose allocation reached their sketch width

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.error_sq / self.total_sq) if self.total_sq > 0 else 0.0

    @property
    def uniform_relative_error(self) -> float:
        return math.sqrt(self.uniform_error_sq / self.total_sq) if self.total_sq > 0 else 0.0


def _greedy(layers: list[LayerSpectrum], budget: int, elem: int) -> dict[str, int]:
    """Directions in order of σ²-per-byte, while they fit (a layer's next direction is worth less than
    its last, so each layer's candidates come from a heap one at a time)."""
    ranks = {sp.key: 0 for sp in layers}
    left = budget
    heap = []
    for i, sp in enumerate(layers):
        if sp.cap > 0 and sp.width > 0:
            heap.append((-float(sp.singular_values[0]) ** 2 / (sp.bytes_per_rank(elem) + sp.overhead), i))
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        sp = layers[i]
        cost = sp.bytes_per_rank(elem) + (sp.overhead if ranks[sp.key] == 0 else 0)
        if cost > left:
            continue  # this layer's next direction does not fit, nor will its later ones (no dearer)
        r = ranks[sp.key] + 1
        ranks[sp.key] = r
        left -= cost
        if r < min(sp.cap, sp.width) and float(sp.singular_values[r]) > 0:
            heapq.heappush(heap, (-float(sp.singular_values[r]) ** 2 / sp.bytes_per_rank(elem), i))
    return ranks


def uniform_rank_for(layers: list[LayerSpectrum], budget: int, elem: int) -> int:
    """The largest rank r such that every layer at min(r, cap) fits in `budget` bytes (0 when none)."""
    def cost(r: int) -> int:
        return sum(min(r, sp.cap) * sp.bytes_per_rank(elem) + (sp.overhead if r else 0) for sp in layers)

    top = max((sp.cap for sp in layers), default=0)
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def allocate(layers: list[LayerSpectrum], budget: int, elem: int) -> Allocation:
    """Ranks per layer for `budget` bytes of factors stored at `elem` bytes per value."""
    total = sum(sp.total_sq for sp in layers)
    greedy = _greedy(layers, budget, elem)
    g_err = sum(sp.error_sq(greedy[sp.key]) for sp in layers)
    u = uniform_rank_for(layers, budget, elem)
    uniform = {sp.key: min(u, sp.cap, sp.width) for sp in layers}
    u_err = sum(sp.error_sq(uniform[sp.key]) for sp in layers)
    ranks, err, chose = (greedy, g_err, "greedy") if g_err <= u_err else (uniform, u_err, "uniform")
    used = sum(ranks[sp.key] * sp.bytes_per_rank(elem) + (sp.overhead if ranks[sp.key] else 0) for sp in layers)
    limited = [sp.key for sp in layers if not sp.complete and ranks[sp.key] >= sp.width]
    return Allocation(ranks, used, err, total, u, u_err, chose, limited)


def initial_width(layers_shapes: list[tuple[int, int, int]], budget: int, elem: int, start: int = 32) -> int:
    """The first sketch width: twice the uniform rank the budget allows (≥ `start`), so that one round of
    sketches usually covers every layer's allocation. `layers_shapes`: (m, n, cap) per layer."""
    fake = [LayerSpectrum(str(i), m, n, cap, 0.0, torch.zeros(0)) for i, (m, n, cap) in enumerate(layers_shapes)]
    return max(start, 2 * uniform_rank_for(fake, budget, elem))
