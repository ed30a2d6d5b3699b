"""Compose LoRAs: several canonical LoRAs with strengths into one — exact by default, optimally
re-compressed to a rank (or an energy target) on request — and re-rank a single LoRA the same way.

Exact mode stacks every module's low-rank terms so that the stored product equals Σ strength_i · ΔW_i:
one term per group of overlapping row ranges (a fused `qkv` term and split `to_q/to_k/to_v` terms on the
same weight become one term, the split ups zero-padded into their rows; disjoint slices stay separate
terms, as diffusers files have them). The coefficients are folded into the factors relative to the
largest one, which is stored as alpha/rank — so equal coefficients (a single LoRA, equal strengths)
leave the input factors untouched. Full diffs and bias diffs are summed with strengths; a replacement
(`set_weight`) is allowed once per weight, and later changes to that weight are folded into it (what
ComfyUI's LoRA chain does: a replacement overwrites what came before, later deltas add to it).

A low-rank change and a full diff on the same weight are folded into one diff (a file cannot hold
both for one weight: ComfyUI keeps only the last).

Re-compress mode computes, per module, the optimal rank-r approximation of the composed ΔW from the
stacked factors (`lowrank.recompress`: QR + SVD of an R×R core, no out×in matrix) and reports its
error against the exact composition from the discarded singular values. Split q/k/v slices of a fused
weight are re-compressed together (rank r for the fused weight) into slice terms sharing one down,
which writers store fused at rank r or split with a shared down.

Planning (validation: architectures, shapes, duplicate replacements) runs over every module before any
arithmetic, so a bad input fails before work is done and nothing partial is produced.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import BadFileError, MismatchError
from ..progress import ProgressFn, no_progress
from ..report import format_table
from .lowrank import recompress
from .model import LoRA, LoraTerm, ModuleDelta

DEFAULT_WARN_RANK = 256
FP32_MAX = torch.finfo(torch.float32).max


def lora_arch(arch: str) -> str:
    """The LoRA key space of an architecture name: flux-dev / flux-schnell / flux → flux."""
    return "flux" if arch.startswith("flux") else arch


# ----------------------------------------------------------------------------------------------- plan


@dataclass
class _Piece:
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


@dataclass
class _ModulePlan:
    name: str
    pieces: list[_Piece] = field(default_factory=list)
    diffs: list[tuple[torch.Tensor, float, int]] = field(default_factory=list)  # (diff, strength, input)
    bias_diffs: list[tuple[torch.Tensor, float, int]] = field(default_factory=list)
    replacement: tuple[torch.Tensor, int] | None = None  # (set_weight, input)
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


def _piece(module: str, term: LoraTerm, strength: float, source: int, name: str) -> _Piece:
    up2 = term.up.reshape(term.up.shape[0], -1)
    down2 = term.down.reshape(term.down.shape[0], -1)
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
    return _Piece(
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


def _clusters(pieces: list[_Piece]) -> list[list[_Piece]]:
    """Group pieces whose row ranges overlap (a full-weight term overlaps everything)."""
    groups: list[list[_Piece]] = []
    end = -1
    for p in sorted(pieces, key=lambda p: (p.start, -p.length)):
        if groups and p.start < end:
            groups[-1].append(p)
            end = max(end, p.end)
        else:
            groups.append([p])
            end = p.end
    return groups


def _cluster_rows(group: list[_Piece]) -> tuple[int, int, bool]:
    start = min(p.start for p in group)
    end = max(p.end for p in group)
    return start, end - start, any(p.full for p in group)


def _stack_cluster(group: list[_Piece], coef_of, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D) of one row cluster with U @ D = Σ coef·up@down: ups placed in their rows of the cluster (zero
    elsewhere) times sign·√|coef|, downs stacked times √|coef|. One fp32 copy per factor; a coefficient
    of ±1 leaves the values bit-identical."""
    start, length, _ = _cluster_rows(group)
    total = sum(p.rank for p in group)
    covers = all(p.start == start and p.length == length for p in group)
    up = (torch.empty if covers else torch.zeros)(length, total, dtype=torch.float32, device=device)
    down = torch.empty(total, group[0].down.shape[1], dtype=torch.float32, device=device)
    col = 0
    for p in group:
        c = coef_of(p)
        root = math.sqrt(abs(c))
        _scaled_copy(up[p.start - start : p.end - start, col : col + p.rank], p.up, math.copysign(root, c))
        _scaled_copy(down[col : col + p.rank], p.down, root)
        col += p.rank
    return up, down


def _scaled_copy(dst: torch.Tensor, src: torch.Tensor, factor: float) -> None:
    """dst = src · factor, computed in dst's dtype (fp32) whatever src's dtype: copy (converting), then
    scale in place. (A single mixed-dtype `torch.mul(..., out=)` measured 5x slower than the two passes.)"""
    dst.copy_(src)
    if factor != 1.0:
        dst.mul_(factor)


def _shape_factors(group: list[_Piece], up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Restore conv layouts: up [out, r, 1, 1] and down [r, in, kh, kw] when any input stored them so."""
    r = down.shape[0]
    tail = next((p.down_tail for p in group if len(p.down_tail) > 1), None)
    if tail is not None:
        down = down.reshape(r, *tail)
    if any(p.up_ndim > 2 for p in group):
        extra = max(p.up_ndim for p in group) - 2
        up = up.reshape(up.shape[0], r, *([1] * extra))
    return up.contiguous(), down.contiguous()


@dataclass
class ModuleReport:
    module: str
    inputs: list[str]
    kind: str  # lowrank / diff / set, "+bias" when a bias diff is present
    rank_in: int
    rank_out: int
    norm: float = 0.0  # ‖composed ΔW‖_F of the low-rank part (re-compress mode; 0 when not computed)
    abs_error: float = 0.0
    rel_error: float = 0.0
    energy_kept: float = 1.0
    note: str = ""
    nonfinite_inputs: list[str] = field(default_factory=list)  # inputs whose NaN/Inf reached this module


def _finite(t: torch.Tensor) -> bool:
    """Every value of `t` is finite. A sum first (NaN/Inf propagate into it; measured ~4x cheaper than
    isfinite, which took most of an exact compose's time); only a non-finite sum is confirmed exactly."""
    if t.dtype.itemsize == 1 and t.dtype.is_floating_point:
        t = t.to(torch.float16)  # no fp8 kernels; the conversion is exact
    return math.isfinite(float(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def _delta_is_finite(d: ModuleDelta) -> bool:
    """Every value the module will store is finite, alphas included (they are stored as fp32)."""
    dense = [x for x in (d.diff, d.diff_b, d.set_weight) if x is not None]
    return (all(_finite(t.up) and _finite(t.down) for t in d.terms) and all(_finite(x) for x in dense)
            and all(t.alpha is None or abs(t.alpha) <= FP32_MAX for t in d.terms))


def _nonfinite_inputs(plan: _ModulePlan, names: Sequence[str]) -> list[str]:
    """The inputs whose contribution to this module holds NaN/Inf (scanned only when the result does)."""
    bad = {p.source for p in plan.pieces if not (_finite(p.up) and _finite(p.down))}
    bad |= {i for d, _, i in [*plan.diffs, *plan.bias_diffs] if not _finite(d)}
    if plan.replacement is not None and not _finite(plan.replacement[0]):
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


def _exact_terms(plan: _ModulePlan) -> list[LoraTerm]:
    """Stacked terms, on the CPU: pure copies, which a GPU round trip would only slow down."""
    terms = []
    for group in _clusters(plan.pieces):
        biggest = max(abs(p.coef) for p in group)
        if biggest == 0.0:
            continue
        start, length, full = _cluster_rows(group)
        up, down = _stack_cluster(group, lambda p, g=biggest: p.coef / g, torch.device("cpu"))
        up, down = _shape_factors(group, up, down)
        rank = down.shape[0]
        terms.append(LoraTerm(up=up, down=down, alpha=biggest * rank, rows=None if full else (start, length)))
    return terms


def _recompressed_terms(plan: _ModulePlan, rank: int | None, energy: float | None, device, rep: ModuleReport,
                        names: Sequence[str]) -> list[LoraTerm]:
    groups = _clusters(plan.pieces)
    stacks = [_stack_cluster(g, lambda p: p.coef, device) for g in groups]
    if len(stacks) == 1:
        up_all, down_all = stacks[0]
    else:
        # Disjoint row slices (split q/k/v): the clusters' rows one under the other, each with its own
        # columns, so U_all @ D_all is the module's ΔW on those rows (rows between slices are zero anyway).
        up_all = torch.block_diag(*[u for u, _ in stacks])
        down_all = torch.cat([d for _, d in stacks], dim=0)
    if not (_finite(up_all) and _finite(down_all)):
        raise _nonfinite_recompression_error(plan, names)
    rc = recompress(up_all, down_all, rank, energy)
    rep.norm, rep.abs_error, rep.rel_error, rep.energy_kept = rc.norm, rc.abs_error, rc.rel_error, rc.energy_kept
    rep.rank_out = rc.rank
    if rc.rank == 0:
        return []
    terms = []
    down = rc.down.cpu()
    row = 0
    for group in groups:
        start, length, full = _cluster_rows(group)
        up, d = _shape_factors(group, rc.up[row : row + length].cpu(), down)
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


def _execute_module(plan: _ModulePlan, rank: int | None, energy: float | None, device, names: Sequence[str]) -> tuple[ModuleDelta, ModuleReport]:
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
            out.terms = _exact_terms(plan)
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


@dataclass
class ComposeReport:
    mode: str
    inputs: list[dict]
    modules: list[ModuleReport]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rank_max(self) -> int:
        return max((m.rank_out for m in self.modules), default=0)

    @property
    def total_rel_error(self) -> float:
        """‖error‖/‖ΔW‖ over every re-compressed module together (0 in exact mode)."""
        num = sum(m.abs_error**2 for m in self.modules)
        den = sum(m.norm**2 for m in self.modules)
        return math.sqrt(num / den) if den > 0 else 0.0

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    def summary(self) -> dict:
        return {
            "mode": self.mode,
            "inputs": self.inputs,
            "modules": len(self.modules),
            "rank_max": self.rank_max,
            "total_rel_error": self.total_rel_error,
            "max_rel_error": self.max_rel_error,
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
            "nonfinite_modules": [{"module": m.module, "inputs": m.nonfinite_inputs}
                                  for m in self.modules if m.nonfinite_inputs],
        }

    def to_dict(self) -> dict:
        return {**self.summary(), "per_module": [m.__dict__ for m in self.modules]}

    def table(self, limit: int | None = None) -> str:
        """Per-module rows (the worst errors / highest ranks first when cut to `limit`)."""
        rows = self.modules
        if limit is not None and len(rows) > limit:
            rows = sorted(rows, key=lambda m: (-m.rel_error, -m.rank_out))[:limit]
        cols = ["module", "kind", "inputs", "rank_in", "rank_out"]
        if self.mode != "exact":
            cols += ["rel_error", "energy_kept"]
        cols.append("note")
        number = {i["name"]: str(n) for n, i in enumerate(self.inputs, 1)}  # "#n" as listed in text()
        return format_table([{**m.__dict__, "module": m.module.removeprefix("diffusion_model."),
                              "inputs": ",".join(number.get(x, x) for x in m.inputs)} for m in rows], cols)

    def text(self, limit: int = 25) -> str:
        head = [f"compose ({self.mode}): {len(self.inputs)} input(s) → {len(self.modules)} modules, max rank "
                f"{self.rank_max}, {self.seconds:.2f} s"]
        for n, i in enumerate(self.inputs, 1):
            head.append(f"  #{n} {i['name']}: strength {i['strength']:g}, {i['arch']}/{i['format']}, "
                        f"{i['modules']} modules, rank ≤ {i['rank_max']}")
        if self.mode != "exact":
            head.append(f"error vs exact composition: total {self.total_rel_error:.3e}, worst module {self.max_rel_error:.3e}")
        head += [f"warning: {w}" for w in self.warnings]
        title = "per module" if len(self.modules) <= limit else f"per module ({limit} worst of {len(self.modules)})"
        return "\n".join(head) + "\n\n" + title + "\n" + self.table(limit)


def _mode_name(rank: int | None, energy: float | None) -> str:
    parts = ([f"rank {rank}"] if rank is not None else []) + ([f"energy {energy:g}"] if energy is not None else [])
    return ", ".join(parts) or "exact"


def compose_loras(
    items: Sequence[tuple[LoRA, float]],
    rank: int | None = None,
    energy: float | None = None,
    warn_rank: int = DEFAULT_WARN_RANK,
    names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
) -> tuple[LoRA, ComposeReport]:
    """One LoRA equal to applying each input with its strength (exact mode, `rank=None, energy=None`), or
    the optimal rank-`rank` / `energy`-fraction approximation of that composition per module.
    `names` label the inputs in errors and reports; math runs in fp32 on `device`, results land on the CPU."""
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

    out = LoRA(arch=arch, source_format=_common_format([lo for lo, _ in items]))
    reports = []
    for i, plan in enumerate(plans):
        delta, rep = _execute_module(plan, rank, energy, device, names)
        if not delta.is_empty():
            out.modules[plan.name] = delta
        reports.append(rep)
        progress(i + 1, len(plans))

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
    report = ComposeReport(mode=_mode_name(rank, energy), inputs=inputs, modules=reports, warnings=warnings,
                           seconds=time.perf_counter() - t0)
    out.metadata = {**_shared_metadata([lo for lo, _ in items]), "weightsmith.compose": _recipe(inputs, report.mode)}
    return out, report


def rerank_lora(
    lora: LoRA,
    rank: int | None = None,
    energy: float | None = None,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
    name: str = "LoRA",
) -> tuple[LoRA, ComposeReport]:
    """`lora` reduced to rank ≤ `rank` (and/or an energy fraction) per module, optimally, from its
    factors alone; modules already at or below the rank are kept exactly."""
    if rank is None and energy is None:
        raise MismatchError("re-rank needs a target rank or an energy fraction")
    out, report = compose_loras([(lora, 1.0)], rank=rank, energy=energy, names=[name], device=device,
                                progress=progress, warn_rank=max(rank or 0, DEFAULT_WARN_RANK))
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
