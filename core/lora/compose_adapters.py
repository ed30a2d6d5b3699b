"""Compose for modules that hold LoKr / LoHa / DoRA adapters (the low-rank-only path is `compose.py`).

Exact mode keeps an input's adapters exactly when that input alone changes the module (strength folded
into a factor). Where several inputs (or several types) hit the same weight, one file cannot hold them
together (ComfyUI keeps one patch per weight and file), so the module becomes the exact full diff of their
sum — said in the report with its size against the factors'. With a rank or energy target the summed ΔW
is re-compressed optimally (randomized SVD of that one layer). DoRA is not linear in ΔW: a DoRA module is
kept as it is when its input alone touches it at strength 1, and refused otherwise (that needs the base
weight: materialise it with `weightsmith convert --to-type lora --base MODEL` first).
"""

from __future__ import annotations

import torch

from ..errors import MismatchError
from . import keymaps
from .compose_report import ModuleReport
from .model import ModuleDelta
from .svd import RankPolicy, low_rank


def _shape(plan) -> tuple[tuple[int, int], tuple[int, ...]]:
    """((rows, cols), conv tail) of the weight, from whatever the contributions tell."""
    rows = cols = None
    tail: tuple[int, ...] = ()
    for a, _, _ in plan.adapters:
        p = a.product()
        cols = int(p.flatten(1).shape[1])
        tail = tuple(p.shape[1:]) if p.ndim == 4 else tail
        rows = rows or (a.out_rows if a.rows is None else keymaps.fused_rows(plan.name, a.in_features))
    for p in plan.pieces:
        cols = int(p.down.shape[1])
        tail = p.down_tail if len(p.down_tail) > 1 else tail
        rows = rows or (p.length if p.full else keymaps.fused_rows(plan.name, int(p.down.shape[1])))
    for d, _, _ in plan.diffs:
        cols, rows = int(d.flatten(1).shape[1]), int(d.shape[0])
        tail = tuple(d.shape[1:]) if d.ndim == 4 else tail
    if rows is None or cols is None:
        raise MismatchError(f"module {plan.name!r}: cannot tell the shape of its weight from the inputs")
    return (rows, cols), tail


def _dense(plan, shape: tuple[int, int]) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float32)
    for a, s, _ in plan.adapters:
        start, length = a.rows or (0, shape[0])
        out[start : start + length] += a.with_strength(s).delta((length, shape[1]))
    for p in plan.pieces:
        out[p.start : p.end] += (p.up.float() @ p.down.float()) * p.coef
    for d, s, _ in plan.diffs:
        out += d.float().reshape(shape) * s
    return out


def execute_adapter_module(plan, rank: int | None, energy: float | None, names) -> tuple[ModuleDelta, ModuleReport]:
    inputs = [names[i] for i in dict.fromkeys(plan.sources)]
    rep = ModuleReport(module=plan.name, inputs=inputs, kind="", rank_in=plan.rank_in, rank_out=0,
                       note="; ".join(plan.notes))
    out = ModuleDelta()
    if plan.replacement is not None:
        raise MismatchError(f"module {plan.name!r}: {', '.join(inputs)} replace the weight (set_weight) and patch it "
                            "with an adapter; compose them separately")
    kinds = sorted({a.kind for a, _, _ in plan.adapters} | ({"lora"} if plan.pieces else set())
                   | ({"diff"} if plan.diffs else set()))
    alone = len({i for _, _, i in plan.adapters}) == 1 and not plan.pieces and not plan.diffs
    dora = [names[i] for a, _, i in plan.adapters if not a.is_linear]
    if dora and not (alone and rank is None and energy is None and all(s == 1.0 for _, s, _ in plan.adapters)):
        raise MismatchError(f"module {plan.name!r}: {', '.join(dict.fromkeys(dora))} holds a DoRA adapter there, "
                            "whose change depends on the base weight, so it cannot be composed with other changes, "
                            "scaled or re-ranked without the model: convert that LoRA first with `weightsmith convert "
                            "IN -o OUT --to-type lora --base MODEL`, or compose it at strength 1 where no other input "
                            "touches its modules")
    if rank is None and energy is None and alone:
        out.adapters = [a.with_strength(s) for a, s, _ in plan.adapters]
        rep.kind = "+".join(out.types())
    else:
        (rows, cols), tail = _shape(plan)
        dense = _dense(plan, (rows, cols))
        if rank is None and energy is None:
            if len(tail) <= 1 and any(a.product().ndim != 2 for a, _, _ in plan.adapters):
                raise MismatchError(f"module {plan.name!r}: cannot tell its conv kernel shape for a full diff; "
                                    "compose with --rank")
            out.diff = dense.reshape(rows, *tail) if tail else dense
            factors = sum(a.numel() for a, _, _ in plan.adapters) + sum(p.up.numel() + p.down.numel()
                                                                        for p in plan.pieces)
            rep.note = "; ".join(filter(None, [rep.note, f"{'+'.join(kinds)} on one weight: one file holds one patch "
                                               f"per weight, so written as the exact full diff ({dense.numel():,} "
                                               f"values vs {factors:,} in the factors)"]))
            rep.kind = "diff"
        else:
            policy = RankPolicy("energy", energy=energy, max_rank=rank) if energy is not None else \
                RankPolicy("fixed", rank=rank)
            lr = low_rank(dense, policy, power_iterations=4)
            rep.norm = float(dense.norm())
            rep.abs_error = float((dense - lr.up @ lr.down).norm())
            rep.rel_error = rep.abs_error / rep.norm if rep.norm else 0.0
            rep.energy_kept = lr.energy
            rep.rank_out = lr.rank
            rep.note = "; ".join(filter(None, [rep.note, f"{'+'.join(kinds)}: re-compressed from the layer's dense ΔW"]))
            if lr.rank:
                from .model import LoraTerm

                down = lr.down.reshape(lr.rank, *tail) if tail else lr.down
                up = lr.up.reshape(rows, lr.rank, *([1] * (len(tail) - 1))) if tail else lr.up
                out.terms = [LoraTerm(up=up.contiguous(), down=down.contiguous(), alpha=float(lr.rank))]
            rep.kind = "lowrank"
    if plan.bias_diffs:
        b = plan.bias_diffs[0][0]
        acc = torch.zeros(b.shape, dtype=torch.float32)
        for d, s, _ in plan.bias_diffs:
            acc += d.float().reshape(b.shape) * s
        out.diff_b = acc
        rep.kind += "+bias"
    return out, rep
