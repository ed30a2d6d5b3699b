"""Size budget for compose / rerank: ranks per module for one output file size.

Each module's composed low-rank ΔW has an exact spectrum from its stacked factors (QR + the SVD of an
R×R core, `lowrank.svd_of_product`: no out×in matrix, no SVD of a layer), so the allocation of
`budget.allocate` (σ² per byte, greedily, never worse than a uniform rank) works on exact values here.
Modules that cannot be re-ranked (full diffs, replacements, LoKr/LoHa/DoRA adapters) and bias changes
are the file's fixed part; the ranks get the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .budget import HEADER_SLACK, METADATA_ALLOWANCE, LayerSpectrum, allocate, format_size, tensor_header_bytes
from .compose_stack import clusters
from .lowrank import svd_of_product
from .svd import OptionError

ALPHA_BYTES = 4


def _dense_bytes(plan, elem: int, size: int) -> int:
    """Bytes of a module's parts that are stored whole (diff / replacement, bias change)."""
    total = 0
    dense = plan.replacement[0] if plan.replacement is not None else (plan.diffs[0][0] if plan.diffs else None)
    if dense is not None:
        total += dense.numel() * elem + tensor_header_bytes(f"{plan.name}.diff", tuple(dense.shape), size)
    if plan.bias_diffs:
        b = plan.bias_diffs[0][0]
        total += b.numel() * elem + tensor_header_bytes(f"{plan.name}.diff_b", tuple(b.shape), size)
    return total


def _adapter_bytes(plan, elem: int, size: int) -> int:
    """An adapter module kept as it is (or composed to a full diff): its tensors' bytes, as an estimate."""
    total = 0
    for adapter, _strength, _i in plan.adapters:
        for t in vars(adapter).values():
            if isinstance(t, torch.Tensor):
                total += t.numel() * elem + tensor_header_bytes(f"{plan.name}.x", tuple(t.shape), size)
    return total


def budget_ranks(plans: Sequence, size: int, dtype: torch.dtype, rank_cap: int | None, device,
                 names: Sequence[str]) -> tuple[dict[str, int], dict]:
    """({module: rank} for the re-rankable modules, the allocation's report) for a file of `size` bytes."""
    from .compose import stacked_factors

    elem = dtype.itemsize
    fixed = HEADER_SLACK + METADATA_ALLOWANCE
    layers: list[LayerSpectrum] = []
    for plan in plans:
        fixed += _dense_bytes(plan, elem, size)
        if plan.adapters:
            fixed += _adapter_bytes(plan, elem, size)
            continue
        if not plan.pieces or plan.diffs or plan.replacement is not None:
            continue  # no pieces, or folded into the dense part (counted above)
        up, down = stacked_factors(plan, device, names)
        s = svd_of_product(up, down).singular_values.double().cpu()
        m, n = int(up.shape[0]), int(down.shape[1])
        nonzero = int((s > 0).sum())
        cap = nonzero if rank_cap is None else min(nonzero, rank_cap)
        groups = len(clusters(plan.pieces))
        overhead = ALPHA_BYTES * groups + groups * (
            tensor_header_bytes(f"{plan.name}.lora_up.weight", (m, cap), size)
            + tensor_header_bytes(f"{plan.name}.lora_down.weight", (cap, n), size)
            + tensor_header_bytes(f"{plan.name}.alpha", (), size))
        layers.append(LayerSpectrum(plan.name, m, n, cap, float(s.square().sum()), s[:cap], complete=True,
                                    overhead=overhead))
    budget = size - fixed
    if budget <= 0:
        raise OptionError(f"size {format_size(size)} leaves nothing for the ranks: the parts that are stored whole "
                          f"(full diffs, replacements, adapters, bias changes, header) take {format_size(fixed)}; "
                          "give a larger size")
    alloc = allocate(layers, budget, elem)
    ranks = [r for r in alloc.ranks.values() if r]
    line = (f"size budget {format_size(size)}: ranks {min(ranks) if ranks else 0}-{max(ranks) if ranks else 0} over "
            f"{len(ranks)} modules (about {format_size(fixed + alloc.rank_bytes)}); relative error "
            f"{alloc.relative_error:.4g} vs {alloc.uniform_relative_error:.4g} at the best uniform rank of that size "
            f"({alloc.uniform_rank})")
    report = {"size": size, "fixed_bytes": fixed, "rank_bytes": alloc.rank_bytes,
              "estimated_bytes": fixed + alloc.rank_bytes, "allocation": alloc.chose,
              "relative_error": alloc.relative_error, "uniform_rank": alloc.uniform_rank,
              "uniform_relative_error": alloc.uniform_relative_error, "ranks": dict(alloc.ranks), "lines": [line]}
    return dict(alloc.ranks), report
