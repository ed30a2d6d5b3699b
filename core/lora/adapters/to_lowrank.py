"""Any module as a plain LoRA (`convert --to-type lora`, compose/re-rank with a rank): the optimal rank-R
(or error-target) approximation of its exact ΔW, one layer at a time.

- A lone LoKr: its SVD is the Kronecker product of its factors' SVDs, so the optimum is exact and no
  dense ΔW is formed (`LoKr.best_lowrank`).
- A lone LoHa (no Tucker core): an exact rank-r1·r2 product, re-compressed from its factors (QR + small SVD).
- Anything else (several types on one weight, Tucker cores, full diffs): the dense ΔW of that one layer and
  the randomized SVD extraction uses (4 power iterations; exact SVD where that is as cheap).
DoRA has no ΔW without the base weight: `base` must be given for a DoRA module, else MismatchError.
"""

from __future__ import annotations

import math
import zlib

import torch

from ...errors import MismatchError
from ..lowrank import recompress
from ..svd import RankPolicy, low_rank
from .loha import LoHa
from .lokr import LoKr


def weight_shape(name: str, mod) -> tuple[tuple[int, int], tuple[int, ...]]:
    """((rows, flattened cols), conv tail or ()) of the weight a module patches, from its own tensors."""
    from ..formats_base import module_rows

    tail: tuple[int, ...] = ()
    cols = None
    for a in mod.adapters:
        p = a.product()
        cols, tail = int(p.flatten(1).shape[1]), tuple(p.shape[1:]) if p.ndim == 4 else tail
    for t in mod.terms:
        cols = int(t.down.flatten(1).shape[1])
        tail = tuple(t.down.shape[1:]) if t.down.ndim == 4 else tail
    if mod.diff is not None:
        cols = int(mod.diff.flatten(1).shape[1])
        tail = tuple(mod.diff.shape[1:]) if mod.diff.ndim == 4 else tail
    if cols is None:
        raise MismatchError(f"module {name}: no weight change to factorise")
    return (module_rows(name, mod), cols), tail


def lora_to_lowrank(lora, policy: RankPolicy, seed: int = 0, base=None) -> tuple[object, list[dict]]:
    """Every module that is not already plain low-rank (LoKr, LoHa, DoRA, Tucker, full diff) as one optimal
    low-rank term; plain modules kept exactly. `base`: a TensorSource of the model (needed for DoRA).
    Returns (new LoRA, per-layer reports)."""
    from ..model import LoRA, LoraTerm, ModuleDelta

    out = LoRA(arch=lora.arch, source_format=lora.source_format, metadata=dict(lora.metadata),
               unknown_keys=list(lora.unknown_keys))
    reports = []
    for name in sorted(lora.modules):
        mod = lora.modules[name]
        if not mod.adapters and mod.diff is None:
            out.modules[name] = mod
            continue
        (rows, cols), tail = weight_shape(name, mod)
        w = None
        if not mod.is_linear and base is not None:
            from ..keymaps import weight_key

            key = weight_key(name)
            if key not in base:
                raise MismatchError(f"module {name}: the base model has no {key!r}")
            w = base.get(key).float().reshape(rows, cols)
        up, down, rep = lowrank_of_module(name, mod, (rows, cols), policy, seed, w)
        k = int(down.shape[0])
        new = ModuleDelta(diff_b=mod.diff_b, set_weight=mod.set_weight)
        if k:
            down = down.reshape(k, *tail) if tail else down
            up = up.reshape(rows, k, *([1] * (len(tail) - 1))) if tail else up
            new.terms.append(LoraTerm(up=up.contiguous(), down=down.contiguous(), alpha=float(k)))
        if not new.is_empty():
            out.modules[name] = new
        reports.append({"module": name, **rep})
    return out, reports


def dense_change(mod, shape: tuple[int, int], base: torch.Tensor | None, strength: float = 1.0) -> torch.Tensor:
    """strength · ΔW of a module as [rows, cols] fp32 (set_weight not counted); DoRA through `base`."""
    if mod.is_linear:
        return mod.dense_delta(shape) * strength
    if base is None:
        raise MismatchError("has a DoRA magnitude: its change depends on the base weight, so give the base model "
                            "(or keep the module as it is)")
    w = base.float().reshape(shape)
    return mod.apply(w, strength) - w


def lowrank_of_module(name: str, mod, shape: tuple[int, int], policy: RankPolicy, seed: int = 0,
                      base: torch.Tensor | None = None, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(up [rows, k], down [k, cols], report) of the optimal approximation of strength · ΔW under `policy`."""
    only = mod.adapters[0] if (len(mod.adapters) == 1 and not mod.terms and mod.diff is None
                               and mod.adapters[0].rows is None and mod.adapters[0].is_linear) else None
    if only is not None and policy.mode == "fixed":
        if isinstance(only, LoKr):
            scaled = only.with_strength(strength)
            up, down, sv = scaled.best_lowrank(policy.rank)
            return up.float(), down.float(), _report("lokr", sv, up.shape[1], "exact (Kronecker SVD)")
        if isinstance(only, LoHa) and only.t1 is None:
            u, v = only.with_strength(strength).lowrank_factors()
            rc = recompress(u, v, rank=policy.rank)
            return rc.up.float(), rc.down.float(), _report("loha", rc.singular_values, rc.rank, "exact (factor QR)")
    try:
        dense = dense_change(mod, shape, base, strength)
    except MismatchError as e:
        raise MismatchError(f"module {name}: {e}") from None
    seed = (seed * 7919 + zlib.crc32(name.encode())) % (2**62)
    lr = low_rank(dense, policy, power_iterations=4, seed=seed)
    total = float(dense.double().square().sum())
    err = float((dense - lr.up @ lr.down).double().square().sum())
    rep = {"type": "+".join(mod.types()), "rank": lr.rank, "method": lr.method,
           "rel_error": math.sqrt(err / total) if total > 0 else 0.0,
           "optimal_rel_error": lr.optimal_error, "optimal_is_exact": lr.optimal_is_exact}
    return lr.up, lr.down, rep


def _report(kind: str, sv: torch.Tensor, rank: int, method: str) -> dict:
    s2 = sv.double().square()
    total = float(s2.sum())
    err = math.sqrt(float(s2[rank:].sum()) / total) if total > 0 else 0.0
    return {"type": kind, "rank": int(rank), "method": method, "rel_error": err, "optimal_rel_error": err,
            "optimal_is_exact": True}
