"""How well a LoRA reproduces a fine-tune: the reconstruction report, for extracted LoRAs and any other.

For every weight the base and tuned models share, the true change ΔW = tuned − base (fp32) is compared
with the change the LoRA applies, ΔŴ (`ModuleDelta.dense_delta`, diffs, biases, `set_weight`):

    error          ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F
    optimal error  the best any rank-r matrix can do, r = the module's rank (`svd.optimal_at_rank`, the one
                   definition extract and validate share: exact where the exact SVD is used, else an upper
                   bound from the randomized SVD extraction uses; 0 for diffs)
    energy kept    the fraction of ‖ΔW‖² the module keeps

Totals weight modules by ‖ΔW‖ (so an untouched-but-noisy layer does not dominate): `error_weighted`
= Σ‖ΔW_i‖·e_i / Σ‖ΔW_i‖, and `error_global` = the relative Frobenius error of the whole model's change
(weights ‖ΔW_i‖²). Coverage counts changed / extracted (or covered) / skipped / dropped (or missing).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..arch import arch_family, detect_arch
from ..dtypes import all_finite
from ..encodings.report import decoded_line, decoded_reads
from ..errors import BadFileError, MismatchError
from ..progress import ProgressFn, no_progress
from ..report import bar_chart, format_table
from ..safetensors_io import TensorInfo
from ..sources import TensorSource, as_source, diffusion_view
from . import keymaps
from .formats import LORA_ARCHES, load_lora
from .model import LoRA, ModuleDelta
from .svd import OPTIMAL_MEANS, OptionError, frobenius, optimal_at_rank, subtract_

# ---------------------------------------------------------------------------------------------------
# Pairing two models


@dataclass
class ModelPair:
    base: TensorSource  # diffusion-model view, prefix stripped
    tuned: TensorSource
    keys: list[str]  # shared keys, in the base's order
    arch: str  # detect_arch of the base ("unknown" when not recognised)
    unpaired: dict[str, list[str]] = field(default_factory=dict)  # "base"/"tuned" -> keys only it has (skipped)

    def info(self, key: str) -> TensorInfo:
        return self.base.info(key)

    def decoded(self) -> dict[str, dict]:
        """"base"/"tuned" -> encoding -> the quantized keys of each that are read decoded."""
        return decoded_reads({"base": self.base, "tuned": self.tuned},
                             [("base", k) for k in self.keys] + [("tuned", k) for k in self.keys])


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(sorted(keys)[:n])
    return shown + (", …" if len(keys) > n else "")


MISSING_POLICIES = ("auto", "skip", "error")


def _known_layer(key: str) -> bool:
    name = key.rsplit(".", 1)[0]
    return bool(keymaps.is_flux_module(name) or keymaps.is_qwen_module(name) or keymaps.is_wan_module(name)
                or keymaps.is_wan_module(key) or keymaps.SD_LDM_RE.match(key))


def _related(a: str, b: str, unpaired: list[str]) -> bool:
    """Two detected architectures close enough to pair over their shared keys (Flux dev and schnell, Wan 2.1
    and 2.2 of one size): one LoRA architecture, known, and every key only one has is a layer of it (a stray
    tensor is not a related base: it is refused)."""
    return a != "unknown" and lora_arch(a) == lora_arch(b) and all(_known_layer(k) for k in unpaired)


def pair_models(base, tuned, missing: str = "auto") -> ModelPair:
    """The diffusion models of `base` and `tuned` (paths, dicts or TensorSources), checked to share one
    architecture: the same keys (whatever prefix each file uses) with the same shapes.

    Keys only one model has: `error` refuses; `skip` pairs the shared keys and lists the rest in `unpaired`;
    `auto` (default) skips between related bases (Flux dev vs schnell: the guidance embedder) and refuses
    models of different architectures."""
    if missing not in MISSING_POLICIES:
        raise OptionError(f"unknown missing-key policy {missing!r}; choose one of {', '.join(MISSING_POLICIES)}")
    b_src, t_src = as_source(base), as_source(tuned)
    b, t = diffusion_view(b_src), diffusion_view(t_src)
    for src, view in ((b_src, b), (t_src, t)):
        if not len(view):
            raise BadFileError(f"{src.name}: holds no diffusion-model tensors; give a full model file (UNet / "
                               "transformer weights): check it is not a LoRA, a VAE or a text encoder")
    b_arch, t_arch = detect_arch(b_src), detect_arch(t_src)
    t_keys = set(t.keys())
    only_base = [k for k in b.keys() if k not in t_keys]
    only_tuned = sorted(t_keys.difference(b.keys()))
    skip = missing == "skip" or (missing == "auto" and _related(b_arch.arch, t_arch.arch, only_base + only_tuned))
    shared = [k for k in b.keys() if k in t_keys]
    if (only_base or only_tuned) and skip and shared:
        pass
    elif only_base or only_tuned:
        raise MismatchError(
            f"{b_src.name} ({b_arch.arch}) and {t_src.name} ({t_arch.arch}) are not the same architecture: "
            f"{len(only_base)} tensors only in the base ({_examples(only_base) or 'none'}), "
            f"{len(only_tuned)} only in the tuned model ({_examples(only_tuned) or 'none'}). "
            "Extract from a fine-tune and the exact model it was tuned from"
            + (", or pass --missing skip to use the shared keys only." if shared else ".")
        )
    for k in shared:
        sb, st = b.info(k).shape, t.info(k).shape
        if sb != st:
            raise MismatchError(
                f"{k}: shape {list(sb)} in {b_src.name} but {list(st)} in {t_src.name}; the two models are "
                "different architectures or sizes: pass a fine-tune and the exact base model it was tuned from"
            )
        db, dt = b.info(k).dtype, t.info(k).dtype
        if db.is_floating_point != dt.is_floating_point:  # an int/bool copy of a weight has no meaningful ΔW
            raise MismatchError(
                f"{k}: {str(db).replace('torch.', '')} in {b_src.name} but {str(dt).replace('torch.', '')} in "
                f"{t_src.name}; a weight must be floating point in both models: pass the fine-tune and its base "
                "as saved by their trainer (not a converted or quantized copy)"
            )
    unpaired = {n: ks for n, ks in (("base", sorted(only_base)), ("tuned", only_tuned)) if ks}
    return ModelPair(base=b, tuned=t, keys=shared, arch=b_arch.arch, unpaired=unpaired)


def lora_arch(arch: str) -> str:
    """The LoRA architecture name of a model architecture (Flux dev and schnell share LoRAs)."""
    return "flux" if arch in ("flux-dev", "flux-schnell") else arch


# ---------------------------------------------------------------------------------------------------
# The report


@dataclass
class ModuleReport:
    key: str  # model tensor key (prefix stripped): `double_blocks.0.img_attn.qkv.weight`
    shape: tuple[int, ...]
    kind: str  # linear | conv1x1 | conv | vector | bias | other
    status: str  # lowrank | diff | skipped | dropped (extraction); also missing | spurious (validation)
    norm: float  # ‖ΔW‖_F
    error: float  # relative Frobenius error of what the LoRA applies (1.0: nothing applied)
    optimal_error: float | None = None  # best achievable at `rank` (None: not applicable)
    optimal_exact: bool = True  # False: `optimal_error` is the randomized SVD's upper bound
    rank: int | None = None  # None for dense diffs
    energy: float | None = None
    method: str = ""  # randomized | exact | diff | ""
    note: str = ""

    def row(self) -> dict:
        return {
            "key": self.key, "kind": self.kind, "status": self.status, "rank": "" if self.rank is None else self.rank,
            "method": self.method, "norm": self.norm, "error": self.error,
            "optimal": "" if self.optimal_error is None else self.optimal_error,
            "energy": "" if self.energy is None else self.energy,
        }


COVERED = ("lowrank", "diff", "set", "adapter")


def block_of(key: str) -> str:
    """The block a key belongs to, for per-block totals: `double_blocks.3`, `input_blocks.4`, `img_in`."""
    parts = key.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def _aggregate(mods: list[ModuleReport]) -> dict:
    norms = [m.norm for m in mods]
    total_sq = sum(n * n for n in norms)
    total = sum(norms)
    err_sq = sum((m.norm * m.error) ** 2 for m in mods)
    opt = [m.optimal_error if m.optimal_error is not None else (0.0 if m.status in COVERED else 1.0) for m in mods]
    opt_sq = sum((m.norm * o) ** 2 for m, o in zip(mods, opt))
    out = {
        "error_global": math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0,
        "error_weighted": sum(m.norm * m.error for m in mods) / total if total > 0 else 0.0,
        "optimal_global": math.sqrt(opt_sq / total_sq) if total_sq > 0 else 0.0,
    }
    out["ratio_to_optimal"] = out["error_global"] / out["optimal_global"] if out["optimal_global"] > 0 else None
    return out


@dataclass
class ReconstructionReport:
    kind: str  # "extraction" | "validation"
    arch: str
    modules: list[ModuleReport] = field(default_factory=list)
    unchanged: int = 0  # tensors with ΔW exactly 0 (and nothing applied)
    compared: int = 0  # tensors compared
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""
    decoded: dict = field(default_factory=dict)  # "base"/"tuned" -> encoding -> quantized keys decoded
    unpaired: dict = field(default_factory=dict)  # "base"/"tuned" -> keys only that model has (not compared)

    @property
    def changed(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.status not in ("spurious", "nonfinite")]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules:
            out[m.status] = out.get(m.status, 0) + 1
        return out

    def summary(self) -> dict:
        c = self.counts()
        ranks = [m.rank for m in self.modules if m.status == "lowrank" and m.rank is not None]
        methods: dict[str, int] = {}
        for m in self.modules:
            if m.method:
                methods[m.method] = methods.get(m.method, 0) + 1
        out = {
            "kind": self.kind,
            "arch": self.arch,
            "tensors_compared": self.compared,
            "unchanged": self.unchanged,
            "changed": len(self.changed),
            "covered": sum(c.get(s, 0) for s in COVERED),
            "lowrank": c.get("lowrank", 0),
            "diff": c.get("diff", 0),
            "skipped": c.get("skipped", 0),
            "dropped": c.get("dropped", 0),
            "missing": c.get("missing", 0),
            "spurious": c.get("spurious", 0),
            "nonfinite": c.get("nonfinite", 0),
            "rank_min": min(ranks) if ranks else 0,
            "rank_max": max(ranks) if ranks else 0,
            "rank_mean": sum(ranks) / len(ranks) if ranks else 0.0,
            "methods": methods,
            "optimal_is_bound": any(not m.optimal_exact for m in self.modules),
            "seconds": round(self.seconds, 3),
        }
        out.update(_aggregate(self.changed))
        return out

    def blocks(self) -> list[dict]:
        groups: dict[str, list[ModuleReport]] = {}
        for m in self.changed:
            groups.setdefault(block_of(m.key), []).append(m)
        rows = []
        for name, mods in groups.items():
            agg = _aggregate(mods)
            ranks = [m.rank for m in mods if m.rank]
            rows.append({
                "block": name, "modules": len(mods),
                "covered": sum(m.status in COVERED for m in mods),
                "rank": f"{min(ranks)}-{max(ranks)}" if ranks and min(ranks) != max(ranks) else (ranks[0] if ranks else ""),
                "error": agg["error_global"], "optimal": agg["optimal_global"],
                "ratio": agg["ratio_to_optimal"] if agg["ratio_to_optimal"] is not None else "",
            })
        return rows

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(), "settings": self.settings, "message": self.message,
            "warnings": self.warnings(),
            "decoded": self.decoded,
            "unpaired": self.unpaired,
            "blocks": self.blocks(),
            "modules": [dict(m.row(), shape=list(m.shape), optimal_exact=m.optimal_exact, note=m.note) for m in self.modules],
        }

    def headline(self) -> str:
        s = self.summary()
        if self.message:
            return self.message
        ratio = f" = {s['ratio_to_optimal']:.4f}x" if s["ratio_to_optimal"] else ""
        bound = " (bound)" if s["optimal_is_bound"] else ""
        what = "extracted" if self.kind == "extraction" else "covered"
        return (
            f"{self.arch}: {s['changed']} changed tensors of {s['tensors_compared']}: {s['covered']} {what} "
            f"({s['lowrank']} low-rank, rank {s['rank_min']}-{s['rank_max']}; {s['diff']} dense diffs), "
            f"{s['skipped']} skipped, {s['dropped'] + s['missing']} not represented. "
            f"Relative error {s['error_global']:.4g} (weighted mean {s['error_weighted']:.4g}), "
            f"optimal{bound} {s['optimal_global']:.4g}{ratio}."
        )

    def warnings(self) -> list[str]:
        bad = [m for m in self.modules if m.status == "nonfinite"]
        if not bad:
            return []
        shown = "; ".join(f"{m.key} ({m.note})" for m in bad[:8])
        more = f"; … and {len(bad) - 8} more" if len(bad) > 8 else ""
        return [f"WARNING: {len(bad)} tensors hold NaN or Inf and were left out: {shown}{more}. Use an intact copy "
                "of the model (re-download it, or take an earlier checkpoint of a diverged fine-tune)"]

    def text(self, per_module: bool = False) -> str:
        decoded = [line] if (line := decoded_line(self.decoded)) else []
        unpaired = [f"{len(ks)} tensors only in the {who} model, not compared: {', '.join(ks)}"
                    for who, ks in self.unpaired.items()]
        explained = [f"note: {OPTIMAL_MEANS}."] if any(m.optimal_error is not None and m.status == "lowrank"
                                                       for m in self.modules) else []
        parts = [self.headline(), *explained, *self.warnings(), *decoded, *unpaired, "",
                 format_table(self.blocks(), title="per block")]
        if per_module:
            parts += ["", format_table([m.row() for m in self.modules], title="per module")]
        return "\n".join(parts)

    def chart(self) -> np.ndarray:
        blocks = self.blocks()
        title = f"LoRA {self.kind}: relative error per block (global {self.summary()['error_global']:.4g})"
        return bar_chart(
            [b["block"] for b in blocks],
            {"error": [b["error"] for b in blocks], "optimal at rank": [b["optimal"] for b in blocks]},
            title=title, ylabel="|dW - LoRA| / |dW|",
        )


@dataclass
class ExtractionReport(ReconstructionReport):
    budget: dict = field(default_factory=dict)  # size-budget allocation (rank mode "budget"), else empty

    def text(self, per_module: bool = False) -> str:
        text = super().text(per_module)
        return "\n".join([*self.budget.get("lines", []), text]) if self.budget else text

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.budget:
            out["budget"] = {k: v for k, v in self.budget.items() if k != "lines"}
        return out


class ValidationReport(ReconstructionReport):
    orphans: list[str]  # LoRA modules whose target the models do not have
    other_components: int  # LoRA modules for text encoders etc. (not checked)

    def __init__(self, *args, orphans: list[str] | None = None, other_components: int = 0, **kw):
        super().__init__(*args, **kw)
        self.orphans = list(orphans or [])
        self.other_components = other_components

    def summary(self) -> dict:
        out = super().summary()
        out["orphan_modules"] = len(self.orphans)
        out["other_component_modules"] = self.other_components
        return out

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["orphans"] = self.orphans
        return out


# ---------------------------------------------------------------------------------------------------
# Measuring one module


def nonfinite_inputs(pair: ModelPair, key: str, delta: torch.Tensor, norm: float) -> list[str] | None:
    """None when ΔW = tuned − base is finite; else which model(s) hold NaN/Inf in `key`. Free in the common
    case: ‖ΔW‖ (computed anyway) is finite exactly when every entry is, unless it overflowed; only a
    non-finite norm costs an exact scan of ΔW and then of both inputs (to name the culprit)."""
    if math.isfinite(norm) or bool(torch.isfinite(delta).all()):
        return None
    bad = [src.name for src in (pair.base, pair.tuned) if not all_finite(src.get(key))]  # fp8 too
    return bad or [f"{pair.base.name} and {pair.tuned.name}: their difference overflows fp32"]


def nonfinite_module(key: str, shape: tuple[int, ...], kind: str, where: list[str]) -> ModuleReport:
    return ModuleReport(key, tuple(shape), kind, "nonfinite", 0.0, 1.0, note="in " + ", ".join(map(str, where)))


def module_kind(key: str, shape: tuple[int, ...]) -> str:
    if key.endswith(".bias"):
        return "bias"
    if len(shape) <= 1:
        return "vector"
    if len(shape) == 2:
        return "linear"
    return "conv1x1" if all(d == 1 for d in shape[2:]) else "conv"


def relative_error(delta: torch.Tensor, approx: torch.Tensor, norm: float) -> float:
    if norm == 0:
        return 0.0
    return frobenius(delta - approx) / norm



# ---------------------------------------------------------------------------------------------------
# Validation of any LoRA


def _as_lora(lora, arch: str) -> LoRA:
    """`lora` as a canonical LoRA, checked to be for the models' architecture family."""
    hint = arch if arch in LORA_ARCHES else None
    if isinstance(lora, (str, os.PathLike, Mapping, TensorSource)):
        return load_lora(lora, arch=hint)
    if not isinstance(lora, LoRA):
        raise TypeError(f"expected a LoRA, a path or a state dict, got {type(lora).__name__}")
    if hint and "unknown" not in (lora.arch, hint) and arch_family(lora.arch) != arch_family(hint):
        raise MismatchError(f"the LoRA is for {lora.arch} but the models are {arch}; validate it against the "
                            f"{lora.arch} models it was made from, or pick a LoRA made for {arch}")
    return lora


def _check_fits(md: ModuleDelta, key: str, shape: tuple[int, ...], where: str) -> None:
    """Refuse a module whose change does not have the shape of the model's tensor `key`, naming both."""
    bias = key.endswith(".bias")
    parts = [("diff_b", md.diff_b)] if bias else [("set_weight", md.set_weight), ("diff", md.diff)]
    size = math.prod(shape)
    bad = [f"{role} {tuple(v.shape)}" for role, v in parts if v is not None and v.numel() != size]
    if not bias:
        for t in md.terms:
            start, length = t.rows or (0, shape[0] if shape else 1)
            if (not shape or start + length > shape[0] or t.up.shape[0] != length
                    or math.prod(t.down.shape[1:]) * shape[0] != size):
                bad.append(f"factors up {tuple(t.up.shape)} down {tuple(t.down.shape)}"
                           + (f" on rows {start}..{start + length}" if t.rows else ""))
        for a in md.adapters:
            start, length = a.rows or (0, shape[0] if shape else 1)
            if not shape or start + length > shape[0] or a.out_rows != length:
                bad.append(f"a {a.kind} of {a.out_rows} rows" + (f" on rows {start}..{start + length}" if a.rows else ""))
    if bad:
        raise MismatchError(f"{where}: the change of {key!r} ({', '.join(bad)}) does not fit the model's tensor of shape "
                            f"{list(shape)}: the LoRA was made for another model; validate it against the models it "
                            "was made from")


def _applied_delta(md: ModuleDelta, key: str, base_w: torch.Tensor, strength: float) -> torch.Tensor | None:
    """What the module does to the tensor `key` (fp32, on base_w's device), or None if it does nothing."""
    dev = base_w.device
    if key.endswith(".bias"):
        return None if md.diff_b is None else md.diff_b.to(dev, torch.float32).reshape(base_w.shape) * strength
    if md.set_weight is not None:
        return md.set_weight.to(dev, torch.float32).reshape(base_w.shape) - base_w
    if md.adapters:  # LoKr / LoHa / DoRA: patched the way ComfyUI patches (DoRA needs the base weight)
        return md.apply(base_w.float(), strength) - base_w.float()
    if not md.terms and md.diff is None:
        return None
    return md.dense_delta(tuple(base_w.shape), torch.float32, dev) * strength


@torch.no_grad()  # sources may hand out nn.Parameters (ModelPatchers): no autograd graphs
def validate_lora(base, tuned, lora, device: str | torch.device = "cpu", strength: float = 1.0,
                  progress: ProgressFn | None = None, missing: str = "auto") -> ValidationReport:
    """The reconstruction report of `lora` (a LoRA, a file in any format `formats.load_lora` reads, or a
    state dict) against the fine-tune it claims to reproduce: `tuned` relative to `base`."""
    t0 = time.perf_counter()
    device = torch.device(device)
    progress = progress or no_progress
    pair = pair_models(base, tuned, missing)
    arch = lora_arch(pair.arch)
    lora_name = str(lora) if isinstance(lora, (str, os.PathLike)) else getattr(lora, "name", "the LoRA")
    lora = _as_lora(lora, arch)
    keys = set(pair.keys)
    targets: dict[str, ModuleDelta] = {}
    orphans, other = [], 0
    for name, md in lora.modules.items():
        if not name.startswith(keymaps.DIFFUSION):
            other += 1
            continue
        wkey = keymaps.weight_key(name)
        bkey = keymaps.bias_key(name)
        hit = False
        if (md.terms or md.adapters or md.diff is not None or md.set_weight is not None) and wkey in keys:
            targets[wkey] = md
            hit = True
        if md.diff_b is not None and bkey in keys:
            targets[bkey] = md
            hit = True
        if not hit:
            orphans.append(name)
    report = ValidationReport("validation", pair.arch, orphans=orphans, other_components=other, decoded=pair.decoded(),
                              unpaired=pair.unpaired, settings={"strength": strength, "lora_format": lora.source_format,
                                        "lora_arch": lora.arch, "device": str(device)})
    for i, key in enumerate(pair.keys):
        progress(i, len(pair.keys))
        report.compared += 1
        info = pair.info(key)
        if not info.dtype.is_floating_point:
            continue
        b = pair.base.get(key).to(device, torch.float32)
        delta = subtract_(pair.tuned.get(key).to(device, torch.float32, copy=True), b)
        norm = frobenius(delta)
        kind = module_kind(key, info.shape)
        where = nonfinite_inputs(pair, key, delta, norm)
        if where:  # an SVD of it would fail; nothing can be measured on this tensor
            report.modules.append(nonfinite_module(key, info.shape, kind, where))
            continue
        md = targets.get(key)
        if md is not None:
            _check_fits(md, key, tuple(info.shape), lora_name)
        applied = _applied_delta(md, key, b, strength) if md is not None else None
        if applied is None:
            if norm == 0:
                report.unchanged += 1
            else:
                report.modules.append(ModuleReport(key, info.shape, kind, "missing", norm, 1.0))
            continue
        if norm == 0:
            spur = frobenius(applied)
            if spur == 0:
                report.unchanged += 1
                continue
            if not math.isfinite(spur):
                report.modules.append(nonfinite_module(key, info.shape, kind, [f"the LoRA's change ({lora.source_format})"]))
                continue
            report.modules.append(ModuleReport(key, info.shape, kind, "spurious", 0.0, 0.0,
                                               note=f"changes an unchanged tensor by {spur:.4g} (Frobenius)"))
            continue
        err = relative_error(delta, applied, norm)
        if not math.isfinite(err):
            report.modules.append(nonfinite_module(key, info.shape, kind, [f"the LoRA's change ({lora.source_format})"]))
            continue
        dense = key.endswith(".bias") or md.diff is not None or md.set_weight is not None
        if dense:
            status = "set" if md.set_weight is not None and not key.endswith(".bias") else "diff"
            report.modules.append(ModuleReport(key, info.shape, kind, status, norm, err, 0.0, True, None,
                                               max(0.0, 1 - err * err), "diff"))
            continue
        if md.adapters:  # LoKr / LoHa / DoRA: no one rank whose optimal error would compare (was "rank 0" refused)
            report.modules.append(ModuleReport(key, info.shape, kind, "adapter", norm, err, None, True, None,
                                               max(0.0, 1 - err * err), "+".join(md.types())))
            continue
        rank = md.rank
        opt, exact = optimal_at_rank(delta, rank, key)
        report.modules.append(ModuleReport(key, info.shape, kind, "lowrank", norm, err, opt, exact, rank,
                                           max(0.0, 1 - err * err)))
        del b, delta, applied
    progress(len(pair.keys), len(pair.keys))
    if not report.modules:
        report.message = f"base and tuned are identical on all {report.compared} tensors: there is nothing to reproduce"
    report.seconds = time.perf_counter() - t0
    return report
