"""Compose LoRAs: several canonical LoRAs with strengths into one — exact by default, optimally
re-compressed to a rank (or an energy target) on request — and re-rank a single LoRA the same way.

Exact mode stacks every module's low-rank terms so that the stored product equals Σ strength_i · ΔW_i:
one term per group of overlapping row ranges (a fused `qkv` term and split `to_q/to_k/to_v` terms on the
same weight become one term, the split ups zero-padded into their rows; disjoint slices stay separate
terms, as diffusers files have them). The coefficients are folded into the factors relative to the
largest one, which is stored as alpha/rank — so equal coefficients (a single LoRA, equal strengths)
leave the input factors untouched. Given the dtype the result will be stored in, the stacks are built
in it (bf16 inputs cost bf16 copies; `compose_stack` has the dtype rules and which factor takes a
ratio). Full diffs and bias diffs are summed with strengths; a replacement (`set_weight`) is allowed
once per weight, and later changes to that weight are folded into it (what ComfyUI's LoRA chain does:
a replacement overwrites what came before, later deltas add to it).

A low-rank change and a full diff on the same weight are folded into one diff (a file cannot hold
both for one weight: ComfyUI keeps only the last). Modules holding LoKr / LoHa / DoRA adapters go
through `compose_adapters` (kept exactly when one input alone touches them, else an exact full diff or,
with a rank, the optimal re-compression of the layer's ΔW).

Re-compress mode computes, per module, the optimal rank-r approximation of the composed ΔW from the
stacked factors (`lowrank.recompress`: QR + SVD of an R×R core, no out×in matrix) and reports its
error against the exact composition from the discarded singular values. Split q/k/v slices of a fused
weight are re-compressed together (rank r for the fused weight) into slice terms sharing one down,
which writers store fused at rank r or split with a shared down.

Planning (validation: architectures, shapes, duplicate replacements) runs over every module before any
arithmetic, so a bad input fails before work is done and nothing partial is produced. The report
classes live in `compose_report`, the factor stacking in `compose_stack`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..devices import one_cpu_thread
from ..dtypes import FP8_DTYPES, all_finite
from ..errors import BadFileError, MismatchError
from ..pipeline import default_workers
from ..progress import ProgressFn, no_progress
from .compose_report import ComposeReport, ModuleReport, mode_name
from .compose_stack import (
    Piece,
    balanced_factors,
    cluster_rows,
    clusters,
    exact_cluster,
    shape_factors,
    stack_cluster,
)
from .lowrank import recompress
from .model import LoRA, LoraTerm, ModuleDelta

DEFAULT_WARN_RANK = 256
FP32_MAX = torch.finfo(torch.float32).max
CPU = torch.device("cpu")


def lora_arch(arch: str) -> str:
    """The LoRA key space of an architecture name: flux-dev / flux-schnell / flux → flux."""
    return "flux" if arch in ("flux-dev", "flux-schnell") else arch


# ----------------------------------------------------------------------------------------------- plan


@dataclass
class _ModulePlan:
    name: str
    pieces: list[Piece] = field(default_factory=list)
    diffs: list[tuple[torch.Tensor, float, int]] = field(default_factory=list)  # (diff, strength, input)
    bias_diffs: list[tuple[torch.Tensor, float, int]] = field(default_factory=list)
    replacement: tuple[torch.Tensor, int] | None = None  # (set_weight, input)
    adapters: list = field(default_factory=list)  # (LoKr/LoHa/DoRA adapter, strength, input): compose_adapters
    notes: list[str] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)

    @property
    def rank_in(self) -> int:
        return sum(p.rank for p in self.pieces)


def _check_arches(loras: Sequence[LoRA], names: Sequence[str]) -> str:
    arches = {lora_arch(lo.arch) for lo in loras if lo.arch != "unknown"}
    if len(arches) <= 1:
        return arches.pop() if arches else "unknown"
    listing = ", ".join(f"{n}: {lo.arch}" for n, lo in zip(names, loras))
    if arches == {"flux", "chroma"}:
        raise MismatchError(
            f"cannot compose LoRAs of different architectures ({listing}). To use a Flux LoRA on Chroma, convert "
            "it first with the Flux→Chroma conversion (node 'Flux LoRA to Chroma (Weightsmith)', CLI "
            "`weightsmith convert IN -o OUT --target-arch chroma`, or weightsmith.lora.convert.flux_to_chroma), "
            "then compose the converted file."
        )
    raise MismatchError(f"cannot compose LoRAs of different architectures ({listing}); compose LoRAs of one model family.")


def _piece(module: str, term: LoraTerm, strength: float, source: int, name: str) -> Piece:
    # fp8 factors are stacked as bf16, which holds them exactly: torch has no fp8 arithmetic or promotion
    up2, down2 = (t.to(torch.bfloat16) if t.dtype in FP8_DTYPES else t
                  for t in (term.up.reshape(term.up.shape[0], -1), term.down.reshape(term.down.shape[0], -1)))
    if up2.shape[1] != down2.shape[0]:
        raise MismatchError(
            f"{name}: module {module!r} has a LoRA term with up {tuple(term.up.shape)} and down "
            f"{tuple(term.down.shape)} whose ranks differ; the file is damaged."
        )
    if term.rows is None:
        start, length, full = 0, int(up2.shape[0]), True
    else:
        start, length = int(term.rows[0]), int(term.rows[1])
        full = False
        if length != up2.shape[0] or start < 0:
            raise MismatchError(
                f"{name}: module {module!r} has a term for rows {term.rows} but its up has {up2.shape[0]} rows."
            )
    return Piece(
        up=up2, down=down2, coef=strength * term.scale, start=start, length=length, full=full, source=source,
        up_ndim=term.up.ndim, down_tail=tuple(term.down.shape[1:]),
    )


def _plan_module(name: str, contributions: list[tuple[int, ModuleDelta, float]], names: Sequence[str]) -> _ModulePlan:
    plan = _ModulePlan(name)
    for idx, delta, strength in contributions:
        plan.sources.append(idx)
        if strength == 0.0:
            continue
        if delta.set_weight is not None:
            if plan.replacement is not None:
                first = names[plan.replacement[1]]
                raise MismatchError(
                    f"both {first} and {names[idx]} replace the weight of {name!r} (set_weight); a weight can be "
                    "replaced only once — leave one of them out, or compose them separately."
                )
            if plan.pieces or plan.diffs:
                plan.notes.append(f"replacement from {names[idx]} overrides earlier changes (as in ComfyUI's chain)")
                plan.pieces, plan.diffs = [], []
            plan.replacement = (delta.set_weight, idx)
            if strength != 1.0:
                plan.notes.append(f"replacement from {names[idx]} applied as is (a replacement has no strength, as in ComfyUI)")
        for term in delta.terms:
            piece = _piece(name, term, strength, idx, names[idx])
            if piece.coef != 0.0:  # alpha 0: the term changes nothing and would only add rank
                plan.pieces.append(piece)
        if delta.diff is not None:
            plan.diffs.append((delta.diff, strength, idx))
        plan.adapters.extend((a, strength, idx) for a in delta.adapters)
        if delta.diff_b is not None:
            plan.bias_diffs.append((delta.diff_b, strength, idx))
    _validate_shapes(plan, names)
    return plan


def _validate_shapes(plan: _ModulePlan, names: Sequence[str]) -> None:
    """Every contribution must describe the same weight: same input width, consistent rows, same diff shapes."""
    if plan.pieces:
        ref = plan.pieces[0]
        full_rows = {p.length for p in plan.pieces if p.full}
        if len(full_rows) > 1:
            who = ", ".join(f"{names[p.source]}: {p.length}" for p in plan.pieces if p.full)
            raise MismatchError(f"module {plan.name!r} has different output sizes in the inputs ({who}): these LoRAs "
                                "were made for different models; compose only LoRAs made for the same model")
        limit = full_rows.pop() if full_rows else None
        for p in plan.pieces:
            if p.down.shape[1] != ref.down.shape[1]:
                raise MismatchError(
                    f"module {plan.name!r}: {names[ref.source]} has input width {ref.down_tail}, {names[p.source]} "
                    f"has {p.down_tail}: these LoRAs were made for different models; compose only LoRAs made for "
                    "the same model"
                )
            if limit is not None and p.end > limit:
                raise MismatchError(
                    f"module {plan.name!r}: {names[p.source]} targets rows {p.start}..{p.end} of a weight with {limit} "
                    "rows: the LoRAs were made for different models; compose only LoRAs made for the same model"
                )
        tails = {p.down_tail for p in plan.pieces if len(p.down_tail) > 1}
        if len(tails) > 1:
            raise MismatchError(f"module {plan.name!r}: {', '.join(names[i] for i in dict.fromkeys(plan.sources))} use "
                                f"different conv kernel shapes {sorted(tails)}; compose only LoRAs made for the same model")
    shapes = {tuple(d.shape) for d, _, _ in plan.diffs}
    if plan.replacement is not None:
        shapes.add(tuple(plan.replacement[0].shape))
    if len({math.prod(s) for s in shapes}) > 1:
        raise MismatchError(f"module {plan.name!r}: the full diffs / replacements of "
                            f"{', '.join(names[i] for i in dict.fromkeys(plan.sources))} have different shapes "
                            f"{sorted(shapes)}; compose only LoRAs made for the same model")
    if len({d.numel() for d, _, _ in plan.bias_diffs}) > 1:
        raise MismatchError(f"module {plan.name!r}: the bias diffs of {', '.join(names[i] for _, _, i in plan.bias_diffs)} "
                            "have different sizes; compose only LoRAs made for the same model")


def plan_compose(items: Sequence[tuple[LoRA, float]], names: Sequence[str]) -> tuple[str, list[_ModulePlan]]:
    """Validate the inputs and group every module's contributions, in input order. No arithmetic."""
    loras = [lo for lo, _ in items]
    arch = _check_arches(loras, names)
    for (_, s), n in zip(items, names):
        if not math.isfinite(s):
            raise MismatchError(f"{n}: strength {s} is not a finite number; give a finite strength such as 1 or -0.5")
        if abs(s) > FP32_MAX:  # finite for Python, but inf in the fp32 math and in any file
            raise MismatchError(f"{n}: strength {s:g} is beyond fp32's range (±{FP32_MAX:.3g}), so the composed "
                                "change would be infinite; give a smaller strength")
    per_module: dict[str, list[tuple[int, ModuleDelta, float]]] = {}
    for idx, (lora, strength) in enumerate(items):
        for mod_name, delta in lora.modules.items():
            if not delta.is_empty():
                per_module.setdefault(mod_name, []).append((idx, delta, float(strength)))
    return arch, [_plan_module(name, contribs, names) for name, contribs in per_module.items()]


# -------------------------------------------------------------------------------------------- execute


def _delta_is_finite(d: ModuleDelta) -> bool:
    """Every value the module will store is finite, alphas included (they are stored as fp32)."""
    dense = [x for x in (d.diff, d.diff_b, d.set_weight) if x is not None]
    with one_cpu_thread(CPU):  # one memory-bound sum per tensor (all on the CPU by now)
        return (all(all_finite(t.up) and all_finite(t.down) for t in d.terms) and all(all_finite(x) for x in dense)
                and all(t.alpha is None or abs(t.alpha) <= FP32_MAX for t in d.terms))


def _nonfinite_inputs(plan: _ModulePlan, names: Sequence[str]) -> list[str]:
    """The inputs whose contribution to this module holds NaN/Inf (scanned only when the result does)."""
    bad = {p.source for p in plan.pieces if not (all_finite(p.up) and all_finite(p.down))}
    bad |= {i for d, _, i in [*plan.diffs, *plan.bias_diffs] if not all_finite(d)}
    if plan.replacement is not None and not all_finite(plan.replacement[0]):
        bad.add(plan.replacement[1])
    return [names[i] for i in sorted(bad)]


def _overflow_error(plan: _ModulePlan, names: Sequence[str]) -> MismatchError:
    files = ", ".join(names[i] for i in dict.fromkeys(plan.sources))
    return MismatchError(f"module {plan.name!r} ({files}): the strengths make the composed change overflow fp32 "
                         "(it would be stored as inf); give smaller strengths. Nothing was written")


def _nonfinite_recompression_error(plan: _ModulePlan, names: Sequence[str]) -> Exception:
    """Re-compression factorises the module (QR + SVD), which NaN/Inf make impossible: refuse, naming
    the file(s) and the module, rather than let LAPACK fail."""
    bad = _nonfinite_inputs(plan, names)
    if not bad:
        return _overflow_error(plan, names)
    return BadFileError(f"{', '.join(bad)}: module {plan.name!r} holds NaN or Inf values, so it cannot be re-compressed "
                        "(--rank/--energy, rerank); download the file again or leave it out. An exact compose (no "
                        "--rank/--energy) copies such values as they are, with a warning; `weightsmith inspect FILE` "
                        "lists the tensors that hold them")


def _exact_terms(plan: _ModulePlan, storage: torch.dtype | None) -> list[LoraTerm]:
    """Stacked terms, on the CPU: copies and one multiply per scaled factor, which a GPU round trip would
    only slow down. `storage`: the dtype the caller will write (see compose_stack.exact_layout)."""
    terms = []
    with one_cpu_thread(CPU):  # memory-bound passes: threads add little, and stall on a busy machine
        for group in clusters(plan.pieces):
            start, length, full = cluster_rows(group)
            up, down, scale = exact_cluster(group, storage)
            up, down = shape_factors(group, up, down)
            rank = down.shape[0]
            terms.append(LoraTerm(up=up, down=down, alpha=scale * rank, rows=None if full else (start, length)))
    return terms


def stacked_factors(plan: _ModulePlan, device, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_all, D_all) whose product is the module's composed low-rank ΔW, in fp32 on `device`."""
    groups = clusters(plan.pieces)
    stacks = [stack_cluster(g, balanced_factors([p.coef for p in g]), torch.float32, device) for g in groups]
    if len(stacks) == 1:
        up_all, down_all = stacks[0]
    else:
        # Disjoint row slices (split q/k/v): the clusters' rows one under the other, each with its own
        # columns, so U_all @ D_all is the module's ΔW on those rows (rows between slices are zero anyway).
        up_all = torch.block_diag(*[u for u, _ in stacks])
        down_all = torch.cat([d for _, d in stacks], dim=0)
    if not (all_finite(up_all) and all_finite(down_all)):
        raise _nonfinite_recompression_error(plan, names)
    return up_all, down_all


def _recompressed_terms(plan: _ModulePlan, rank: int | None, energy: float | None, device, rep: ModuleReport,
                        names: Sequence[str]) -> list[LoraTerm]:
    groups = clusters(plan.pieces)
    up_all, down_all = stacked_factors(plan, device, names)
    rc = recompress(up_all, down_all, rank, energy)
    rep.norm, rep.abs_error, rep.rel_error, rep.energy_kept = rc.norm, rc.abs_error, rc.rel_error, rc.energy_kept
    rep.rank_out = rc.rank
    if rc.rank == 0:
        return []
    terms = []
    down = rc.down.cpu()
    row = 0
    for group in groups:
        start, length, full = cluster_rows(group)
        up, d = shape_factors(group, rc.up[row : row + length].cpu(), down)
        row += length
        terms.append(LoraTerm(up=up, down=d, alpha=float(rc.rank), rows=None if full else (start, length)))
    return terms


def _dense_pieces(plan: _ModulePlan, shape: tuple[int, ...], device) -> torch.Tensor:
    """Σ coef · up@down of the module's pieces as a dense [*shape] tensor (for folding into a diff/replacement)."""
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    flat = out.reshape(shape[0], -1)
    for p in plan.pieces:
        flat[p.start : p.end] += (p.up.to(device, torch.float32) @ p.down.to(device, torch.float32)) * p.coef
    return out


def _execute_module(plan: _ModulePlan, rank: int | dict[str, int] | None, energy: float | None, device,
                    names: Sequence[str], storage: torch.dtype | None = None) -> tuple[ModuleDelta, ModuleReport]:
    if isinstance(rank, dict):  # a size budget's rank per module (compose_budget); the rest composed exactly
        rank = rank.get(plan.name)
    if plan.adapters:
        from .compose_adapters import execute_adapter_module

        return execute_adapter_module(plan, rank, energy, names)
    rep = ModuleReport(module=plan.name, inputs=[names[i] for i in dict.fromkeys(plan.sources)], kind="",
                       rank_in=plan.rank_in, rank_out=0, note="; ".join(plan.notes))
    out = ModuleDelta()
    dense_shape = plan.replacement[0].shape if plan.replacement is not None else (plan.diffs[0][0].shape if plan.diffs else None)
    diff = None
    if plan.diffs:
        diff = torch.zeros(dense_shape, dtype=torch.float32, device=device)
        for d, s, _ in plan.diffs:
            diff += d.to(device, torch.float32).reshape(dense_shape) * s
    if plan.pieces and dense_shape is not None:
        # One file cannot hold a LoRA and a diff/replacement for the same weight (ComfyUI keeps only the
        # last), so the low-rank part is folded into the dense one: exact, and loadable.
        dense = _dense_pieces(plan, tuple(dense_shape), device)
        diff = dense if diff is None else diff + dense
        rep.note = "; ".join([*plan.notes, "low-rank terms folded into the full diff"])
    elif plan.pieces:
        recompressing = energy is not None or (rank is not None and plan.rank_in > rank)
        if recompressing:
            out.terms = _recompressed_terms(plan, rank, energy, device, rep, names)
        else:
            out.terms = _exact_terms(plan, storage)
            rep.rank_out = sum(t.rank for t in out.terms)
    if plan.replacement is not None:
        w = plan.replacement[0].to(device, torch.float32)
        if diff is not None:
            w = w + diff.reshape(w.shape)  # later deltas add onto the replacement
            rep.note = "; ".join([*plan.notes, "later changes folded into the replacement"])
        out.set_weight = w.cpu()
    elif diff is not None:
        out.diff = diff.cpu()
    if plan.bias_diffs:
        b = plan.bias_diffs[0][0]
        acc = torch.zeros(b.shape, dtype=torch.float32, device=device)
        for d, s, _ in plan.bias_diffs:
            acc += d.to(device, torch.float32).reshape(b.shape) * s
        out.diff_b = acc.cpu()
    if not _delta_is_finite(out):
        # NaN/Inf from an input are copied as they are and reported (exact mode: nothing is factorised);
        # NaN/Inf that the strengths created from finite inputs are an overflow, refused
        rep.nonfinite_inputs = _nonfinite_inputs(plan, names)
        if not rep.nonfinite_inputs:
            raise _overflow_error(plan, names)
        rep.note = "; ".join(filter(None, [rep.note, "NaN/Inf from the inputs"]))
    kinds = [k for k, present in (("lowrank", out.terms), ("diff", out.diff is not None),
                                  ("set", out.set_weight is not None), ("bias", out.diff_b is not None)) if present]
    rep.kind = "+".join(kinds) or "zero"
    return out, rep


def _execute_all(plans: list[_ModulePlan], rank: int | dict[str, int] | None, energy: float | None, device: torch.device,
                 names: Sequence[str], storage: torch.dtype | None,
                 progress: ProgressFn) -> list[tuple[ModuleDelta, ModuleReport]]:
    """Every module's (delta, report), in plan order; progress is reported in order, on this thread.

    Exact mode on the CPU is copies, one multiply per scaled factor and a sum per tensor, all memory-bound:
    modules run side by side on worker threads, each running torch on one thread. Unlike torch's own
    threads, which meet at a barrier after every op (and on a busy machine wait there for a descheduled
    one), a stalled worker holds up only its own module."""
    def run(plan: _ModulePlan) -> tuple[ModuleDelta, ModuleReport]:
        return _execute_module(plan, rank, energy, device, names, storage)

    exact_on_cpu = rank is None and energy is None and device.type == "cpu"  # (a budget's dict: not exact)
    workers = default_workers(device) if exact_on_cpu else 1
    if workers < 2 or len(plans) < 2:
        results = []
        for i, plan in enumerate(plans):
            results.append(run(plan))
            progress(i + 1, len(plans))
        return results
    with one_cpu_thread(device), ThreadPoolExecutor(workers, thread_name_prefix="weightsmith-compose") as pool:
        futures = [pool.submit(run, plan) for plan in plans]
        results = []
        try:
            for i, future in enumerate(futures):
                results.append(future.result())
                progress(i + 1, len(plans))
        except BaseException:  # an overflow error, an interrupt: drop the modules not started yet
            for future in futures:
                future.cancel()
            raise
    return results


def compose_loras(
    items: Sequence[tuple[LoRA, float]],
    rank: int | None = None,
    energy: float | None = None,
    warn_rank: int = DEFAULT_WARN_RANK,
    names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
    dtype: torch.dtype | None = None,
    size: int | None = None,
) -> tuple[LoRA, ComposeReport]:
    """One LoRA equal to applying each input with its strength (exact mode, `rank=None, energy=None`), or
    the optimal rank-`rank` / `energy`-fraction approximation of that composition per module, or (`size`
    bytes) ranks allocated across modules to minimise the total error for a file of that size (`rank`
    then caps each module; see compose_budget).
    `names` label the inputs in errors and reports; math runs in fp32 on `device`, results land on the CPU.

    `dtype` is the dtype the caller will store the factors in, if it knows. In exact mode a bf16/fp32/fp64
    `dtype` makes the stacked factors come out in it directly: unscaled factors are copied bit for bit and
    each scaled one is rounded once (instead of an fp32 stack that the save rounds again). Without it (or
    for fp16 / fp8, whose range is narrower), stacks that need scaling are fp32, the others keep the
    inputs' dtype. Re-compressed factors are fp32 whatever `dtype`."""
    t0 = time.perf_counter()
    if not items:
        raise MismatchError("nothing to compose: give at least one LoRA")
    if rank is not None and rank < 1:
        raise MismatchError(f"rank must be at least 1 (got {rank}); leave it out for exact composition")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise MismatchError(f"energy must be a fraction in (0, 1] (got {energy})")
    names = list(names) if names is not None else [f"LoRA #{i + 1}" for i in range(len(items))]
    device = torch.device(device) if device is not None else torch.device("cpu")
    progress = progress or no_progress
    arch, plans = plan_compose(items, names)
    budget: dict = {}
    ranks: int | dict[str, int] | None = rank
    if size is not None:
        from .compose_budget import budget_ranks

        if energy is not None:
            raise MismatchError("a size budget and an energy target do not go together: give one of them")
        ranks, budget = budget_ranks(plans, size, dtype or torch.float32, rank, device, names)

    out = LoRA(arch=arch, source_format=_common_format([lo for lo, _ in items]))
    reports = []
    for plan, (delta, rep) in zip(plans, _execute_all(plans, ranks, energy, device, names, dtype, progress)):
        if not delta.is_empty():
            out.modules[plan.name] = delta
        reports.append(rep)

    warnings = []
    for (lora, _), n in zip(items, names):
        if lora.unknown_keys:
            shown = ", ".join(lora.unknown_keys[:5]) + (" …" if len(lora.unknown_keys) > 5 else "")
            warnings.append(f"{n}: {len(lora.unknown_keys)} key(s) no reader understood were not composed: {shown}")
    nonfinite = [r for r in reports if r.nonfinite_inputs]
    if nonfinite:
        shown = "; ".join(f"{r.module} (from {', '.join(r.nonfinite_inputs)})" for r in nonfinite[:8])
        more = f" … and {len(nonfinite) - 8} more" if len(nonfinite) > 8 else ""
        warnings.append(f"{len(nonfinite)} module(s) hold NaN/Inf values from their inputs, copied as they are: "
                        f"{shown}{more}. A model patched with them gives NaN outputs: download those inputs again or "
                        "leave them out (`weightsmith inspect FILE` lists the tensors)")
    big = [r for r in reports if r.rank_out > warn_rank]
    if big:
        worst = max(big, key=lambda r: r.rank_out)
        warnings.append(f"{len(big)} module(s) exceed rank {warn_rank} (up to {worst.rank_out} at {worst.module}); "
                        "pass a rank to re-compress them")
        for r in big:
            r.note = "; ".join(filter(None, [r.note, f"rank above {warn_rank}"]))
    inputs = [{"name": n, "strength": float(s), "arch": lo.arch, "format": lo.source_format,
               "modules": len(lo.modules), "rank_max": max((m.rank for m in lo.modules.values()), default=0)}
              for (lo, s), n in zip(items, names)]
    report = ComposeReport(mode=mode_name(rank, energy, size), inputs=inputs, modules=reports, warnings=warnings,
                           seconds=time.perf_counter() - t0, budget=budget)
    out.metadata = {**_shared_metadata([lo for lo, _ in items]), "weightsmith.compose": _recipe(inputs, report.mode)}
    return out, report


def rerank_lora(
    lora: LoRA,
    rank: int | None = None,
    energy: float | None = None,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
    name: str = "LoRA",
    size: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[LoRA, ComposeReport]:
    """`lora` reduced to rank ≤ `rank` (and/or an energy fraction, or ranks allocated for a file of `size`
    bytes stored in `dtype`) per module, optimally, from its factors alone; modules already at or below
    the rank are kept exactly."""
    if rank is None and energy is None and size is None:
        raise MismatchError("re-rank needs a target rank, an energy fraction or a file size")
    out, report = compose_loras([(lora, 1.0)], rank=rank, energy=energy, names=[name], device=device,
                                progress=progress, warn_rank=max(rank or 0, DEFAULT_WARN_RANK), size=size,
                                dtype=dtype)
    out.source_format = lora.source_format
    return out, report


def _shared_metadata(loras: Sequence[LoRA]) -> dict[str, str]:
    """Metadata every input carries with the same value (e.g. the SD layout writers need to name modules)."""
    shared = dict(loras[0].metadata)
    for lo in loras[1:]:
        shared = {k: v for k, v in shared.items() if lo.metadata.get(k) == v}
    return shared


def _common_format(loras: Sequence[LoRA]) -> str:
    formats = {lo.source_format for lo in loras}
    return formats.pop() if len(formats) == 1 else "comfy"


def _recipe(inputs: list[dict], mode: str) -> str:
    import json

    return json.dumps({"mode": mode, "inputs": [{"name": i["name"], "strength": i["strength"]} for i in inputs]})
