"""LoRA conversion between architectures that share layers: Flux -> Chroma (and back), remap only.

Chroma keeps every Flux attention / MLP linear, the embedders `img_in` / `txt_in` and `final_layer.linear`
with the same names and shapes; it lost the modulation layers (`*_mod.lin`, single `modulation.lin`,
`final_layer.adaLN_modulation.1`) and the `time_in` / `vector_in` / `guidance_in` embedders, and it has no
CLIP text encoder. So a Flux LoRA converts to Chroma by keeping the factors of the shared layers untouched
(ΔW identical) and dropping the rest, each drop reported by name. No base model is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MismatchError
from ..report import an_arch, arch_name
from . import keymaps as km
from .model import LoRA, ModuleDelta


@dataclass
class ConversionReport:
    source_arch: str
    target_arch: str
    applied: list[str] = field(default_factory=list)  # modules carried over unchanged
    dropped: list[str] = field(default_factory=list)  # modules the target architecture does not have
    unknown: list[str] = field(default_factory=list)  # keys of the source file nothing understood
    reasons: dict[str, str] = field(default_factory=dict)  # dropped module -> why
    details: dict[str, dict] = field(default_factory=dict)  # per-module extras (re-project: change, error)

    @property
    def counts(self) -> dict[str, int]:
        return {"applied": len(self.applied), "dropped": len(self.dropped), "unknown": len(self.unknown)}

    def to_dict(self) -> dict:
        return {"source_arch": self.source_arch, "target_arch": self.target_arch, **self.counts,
                "applied_modules": self.applied, "dropped_modules": self.dropped, "unknown_keys": self.unknown,
                "drop_reasons": self.reasons, **({"module_details": self.details} if self.details else {})}

    def text(self, limit: int = 12) -> str:
        c = self.counts
        lines = [f"{self.source_arch} -> {self.target_arch}: {c['applied']} modules kept unchanged, "
                 f"{c['dropped']} dropped, {c['unknown']} unknown keys"]
        if self.dropped:
            lines.append("dropped (the target has no such layer):")
            lines += [f"  {n}  ({self.reasons.get(n, '')})" for n in self.dropped[:limit]]
            if len(self.dropped) > limit:
                lines.append(f"  … and {len(self.dropped) - limit} more")
        if self.details:
            errs = [d["reextraction_error"] for d in self.details.values()]
            moved = [d["method_change"] for d in self.details.values()]
            lines.append(f"re-projected {len(self.details)} modules: change made by the method up to {max(moved):.4f}, "
                         f"re-extraction error up to {max(errs):.4f} (relative Frobenius)")
        if self.unknown:
            lines.append("unknown keys in the source (not converted):")
            lines += [f"  {k}" for k in self.unknown[:limit]]
            if len(self.unknown) > limit:
                lines.append(f"  … and {len(self.unknown) - limit} more")
        return "\n".join(lines)


def _copy_module(m: ModuleDelta) -> ModuleDelta:
    # Tensors are shared, not copied: conversion never changes values, and LoRA tensors are read-only here.
    return ModuleDelta(terms=list(m.terms), diff=m.diff, diff_b=m.diff_b, set_weight=m.set_weight,
                       adapters=list(m.adapters))


def _remap(lora: LoRA, target: str, drop_reason) -> tuple[LoRA, ConversionReport]:
    """Keep every module `drop_reason(name)` returns None for; report the others."""
    out = LoRA(arch=target, source_format=lora.source_format, metadata=dict(lora.metadata),
               unknown_keys=list(lora.unknown_keys))
    out.metadata["weightsmith.arch"] = target
    if lora.arch != target:
        out.metadata["weightsmith.converted_from"] = lora.arch
    report = ConversionReport(lora.arch, target, unknown=list(lora.unknown_keys))
    for name in sorted(lora.modules):
        reason = drop_reason(name)
        if reason is None:
            out.modules[name] = _copy_module(lora.modules[name])
            report.applied.append(name)
        else:
            report.dropped.append(name)
            report.reasons[name] = reason
    return out, report


def _flux_only_reason(name: str) -> str | None:
    if name.startswith(km.DIFFUSION):
        bfl = name[len(km.DIFFUSION):]
        if km.is_flux_modulation(bfl):
            return "modulation/vector embedding: Chroma computes these in its distilled guidance layer"
        return None
    te = km.split_te(name)
    if te is not None and te[0] != "t5xxl":
        return f"text encoder {te[0]}: Chroma uses T5-XXL only"
    return None


def _chroma_only_reason(name: str) -> str | None:
    if name.startswith(km.DIFFUSION) and km.is_chroma_only(name[len(km.DIFFUSION):]):
        return "Chroma's distilled guidance layer: Flux has no such layer"
    return None


def flux_to_chroma(lora: LoRA) -> tuple[LoRA, ConversionReport]:
    """A Flux LoRA for Chroma: shared layers unchanged, modulation layers (and CLIP) dropped, reported."""
    if lora.arch == "chroma":
        return _remap(lora, "chroma", lambda name: None)
    if lora.arch != "flux":
        raise MismatchError(f"flux_to_chroma needs a Flux LoRA; this one is for {lora.arch} "
                            f"(its layers do not exist in Chroma): use it with {an_arch(lora.arch)} model")
    return _remap(lora, "chroma", _flux_only_reason)


def chroma_to_flux(lora: LoRA) -> tuple[LoRA, ConversionReport]:
    """A Chroma LoRA for Flux: shared layers unchanged, distilled-guidance-layer modules dropped."""
    if lora.arch != "chroma":
        raise MismatchError(f"chroma_to_flux needs a Chroma LoRA; this one is for {lora.arch}: use it with a "
                            f"{arch_name(lora.arch)} model")
    return _remap(lora, "flux", _chroma_only_reason)


def convert_lora(lora: LoRA, to_arch: str | None) -> tuple[LoRA, ConversionReport]:
    """Retarget a LoRA to `to_arch` (None or the same arch: unchanged). Flux <-> Chroma are remaps;
    any other pair has different layers and raises MismatchError."""
    from .formats import normalize_arch

    target = normalize_arch(to_arch)
    if target is None or target == lora.arch:
        return _remap(lora, lora.arch, lambda name: None)
    if lora.arch == "unknown":
        raise MismatchError("the LoRA's architecture is unknown; load it with an explicit arch before converting")
    if (lora.arch, target) == ("flux", "chroma"):
        return flux_to_chroma(lora)
    if (lora.arch, target) == ("chroma", "flux"):
        return chroma_to_flux(lora)
    raise MismatchError(f"cannot convert {an_arch(lora.arch)} LoRA to {arch_name(target)}: the two architectures share no layers "
                        f"a LoRA could be remapped onto (only Flux <-> Chroma can be converted); use it with "
                        f"{an_arch(lora.arch)} model")
