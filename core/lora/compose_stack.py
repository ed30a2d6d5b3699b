"""The factor arithmetic of compose: a module's input terms ("pieces") grouped by overlapping rows and
stacked into one (up, down) per group, so that up @ down = Σ coef · up_i @ down_i.

Exact mode scales each piece by its coefficient relative to the group's largest (whose magnitude becomes
the stored alpha/rank), so a piece with the largest coefficient (and any lone piece) is copied as it is.
Where the caller names the dtype it will store (the CLI does) and that dtype spans fp32's exponent range
(bf16, fp32, fp64), the stack is built directly in it, each ratio on the piece's smaller factor alone:
the other factor is copied bit for bit and each scaled value is rounded once (an fp32 stack cast on
save rounded both factors). Otherwise a stack that needs scaling is built in fp32 with each coefficient
split evenly as √ on both factors (magnitudes stay balanced for a later cast to fp16), and one that
needs none keeps its inputs' dtype. Re-compression stacks in fp32 with the full coefficients, split
evenly the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Dtypes with fp32's exponent range or more: a stack built in one of them cannot overflow or underflow
# where fp32 would not (fp16 can, which is why a stack meant for fp16 is built in fp32 and cast on save).
WIDE_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Piece:
    """One input term of a module: 2-D factors, its coefficient (strength · alpha/rank) and its rows."""

    up: torch.Tensor  # [length, r]
    down: torch.Tensor  # [r, in_flat]
    coef: float
    start: int
    length: int
    full: bool  # the term covers the whole weight (rows=None)
    source: int  # input index
    up_ndim: int
    down_tail: tuple[int, ...]  # down.shape[1:] as stored (conv: (in, kh, kw))

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def end(self) -> int:
        return self.start + self.length


def clusters(pieces: list[Piece]) -> list[list[Piece]]:
    """Group pieces whose row ranges overlap (a full-weight term overlaps everything)."""
    groups: list[list[Piece]] = []
    end = -1
    for p in sorted(pieces, key=lambda p: (p.start, -p.length)):
        if groups and p.start < end:
            groups[-1].append(p)
            end = max(end, p.end)
        else:
            groups.append([p])
            end = p.end
    return groups


def cluster_rows(group: list[Piece]) -> tuple[int, int, bool]:
    """(start, length, covers the whole weight) of a cluster's rows."""
    start = min(p.start for p in group)
    end = max(p.end for p in group)
    return start, end - start, any(p.full for p in group)


def stack_cluster(group: list[Piece], factors: list[tuple[float, float]], dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D) of one row cluster with U @ D = Σ f_up·f_down·up@down, `factors` giving (f_up, f_down) per
    piece: ups placed in their rows of the cluster (zero elsewhere), downs stacked, each scaled by its
    factor, in `dtype` on `device`. A factor of 1 copies the values bit for bit."""
    start, length, _ = cluster_rows(group)
    total = sum(p.rank for p in group)
    covers = all(p.start == start and p.length == length for p in group)
    up = (torch.empty if covers else torch.zeros)(length, total, dtype=dtype, device=device)
    down = torch.empty(total, group[0].down.shape[1], dtype=dtype, device=device)
    plain_ups = covers and all(f_up == 1.0 for f_up, _ in factors) and all(
        p.up.dtype == dtype and p.up.device == up.device for p in group)
    if plain_ups:  # one pass writing whole rows, rather than a column block per piece
        torch.cat([p.up for p in group], dim=1, out=up)
    col = 0
    for p, (f_up, f_down) in zip(group, factors):
        if not plain_ups:
            _scaled_copy(up[p.start - start : p.end - start, col : col + p.rank], p.up, f_up)
        _scaled_copy(down[col : col + p.rank], p.down, f_down)
        col += p.rank
    return up, down


def _scaled_copy(dst: torch.Tensor, src: torch.Tensor, factor: float) -> None:
    """dst = src · factor in dst's dtype. Into a dtype at least as wide as src's (bf16 → fp32), copy then
    scale in place: the conversion is exact, the scale rounds once, and a single mixed-dtype
    `torch.mul(..., out=)` measured 5x slower than the two passes. Same dtype, or narrower (fp32 → bf16):
    one multiply, computed in the wider dtype and rounded once into dst's."""
    if factor == 1.0:
        dst.copy_(src)
    elif src.device != dst.device or (src.dtype != dst.dtype
                                      and torch.promote_types(src.dtype, dst.dtype) == dst.dtype):
        dst.copy_(src)
        dst.mul_(factor)
    else:
        torch.mul(src, factor, out=dst)


def balanced_factors(coefs: list[float]) -> list[tuple[float, float]]:
    """sign·√|c| on the up, √|c| on the down: each coefficient split evenly, so that neither factor's
    magnitude drifts (what a later cast to a narrow dtype such as fp16 needs)."""
    return [(math.copysign(math.sqrt(abs(c)), c), math.sqrt(abs(c))) for c in coefs]


def one_sided_factors(group: list[Piece], ratios: list[float]) -> list[tuple[float, float]]:
    """Each piece's ratio on its smaller factor alone: a multiply there costs about what its copy would,
    and the fewest values are rounded; the other factor is copied as it is (ups in one concatenation when
    all of them are). Measured against ratios always on the down: -10% stacking time on Flux shapes."""
    return [(r, 1.0) if p.up.numel() < p.down.numel() else (1.0, r) for p, r in zip(group, ratios)]


def exact_layout(group: list[Piece], ratios: list[float],
                 storage: torch.dtype | None) -> tuple[torch.dtype, list[tuple[float, float]]]:
    """The dtype to stack a cluster in for exact mode, and each piece's (f_up, f_down):

    - `storage` (the dtype the result will be written in) when it spans fp32's exponent range: the values
      are rounded to it anyway; building in it copies the unscaled factors bit for bit and rounds each
      scaled value once, on one side (|ratio| ≤ 1, so nothing can overflow);
    - else the inputs' own dtype when nothing needs scaling (ratios ±1): pure copies;
    - else fp32 (fp64 when an input is fp64), scaled evenly on both sides, exact to fp32 precision.
    """
    sources = {t.dtype for p in group for t in (p.up, p.down)}
    if storage in WIDE_DTYPES and all(d.is_floating_point for d in sources):
        return storage, one_sided_factors(group, ratios)
    if len(sources) == 1 and all(abs(r) == 1.0 for r in ratios):
        only = next(iter(sources))
        if only in (*WIDE_DTYPES, torch.float16) or all(r == 1.0 for r in ratios):  # fp8 cannot be negated
            return only, one_sided_factors(group, ratios)
    dtype = torch.float32
    for d in sources:
        if d.is_floating_point:
            dtype = torch.promote_types(dtype, d)
    return dtype, balanced_factors(ratios)


def exact_cluster(group: list[Piece], storage: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(U, D, scale) of one cluster with scale · U @ D = Σ coef · up @ down, scale = the largest |coef|
    (stored as alpha / rank). A lone piece that needs no conversion comes back as its own factors."""
    biggest = max(abs(p.coef) for p in group)
    ratios = [p.coef / biggest for p in group]
    dtype, factors = exact_layout(group, ratios, storage)
    lone = group[0]
    if len(group) == 1 and ratios[0] == 1.0 and lone.up.dtype == dtype == lone.down.dtype:
        return lone.up, lone.down, biggest
    up, down = stack_cluster(group, factors, dtype, torch.device("cpu"))
    return up, down, biggest


def shape_factors(group: list[Piece], up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Restore conv layouts: up [out, r, 1, 1] and down [r, in, kh, kw] when any input stored them so."""
    r = down.shape[0]
    tail = next((p.down_tail for p in group if len(p.down_tail) > 1), None)
    if tail is not None:
        down = down.reshape(r, *tail)
    if any(p.up_ndim > 2 for p in group):
        extra = max(p.up_ndim for p in group) - 2
        up = up.reshape(up.shape[0], r, *([1] * extra))
    return up.contiguous(), down.contiguous()
