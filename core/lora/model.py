"""The canonical LoRA: what extraction produces, compose and conversion transform, and writers save.

Modules are named the ComfyUI-native way, with the component prefix kept:
`diffusion_model.double_blocks.0.img_attn.qkv` (BFL/LDM names for the diffusion model) and
`text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1` for text encoders. A module's
change is

    ΔW = Σ_terms  strength · (alpha / rank) · scatter_rows(up @ down)  +  diff
    Δb = diff_b                     (and `set_weight`, when present, replaces W outright)

A term may cover only a slice of rows of a fused weight (`rows=(start, length)`): that is how split
q/k/v LoRAs (diffusers `to_q`, …) target Flux's fused `qkv` and `linear1` without any loss.

Other adapter types (LoKr, LoHa, LoRA with DoRA or a Tucker core) sit in `ModuleDelta.adapters`, one
object per file module (`adapters/`: one module per type, each with its exact ΔW); a DoRA adapter's
change depends on the base weight, so `dense_delta` refuses it and `apply` takes the weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters import Adapter


@dataclass
class LoraTerm:
    up: torch.Tensor  # [out_rows, r] (conv: [out, r, 1, 1])
    down: torch.Tensor  # [r, in] (conv: [r, in, kh, kw])
    alpha: float | None = None  # None: scale 1 (as if alpha == rank)
    strength: float = 1.0
    rows: tuple[int, int] | None = None  # (start, length) within the target's rows; None: all rows

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """The factor a loader applies: strength · alpha / rank."""
        a = 1.0 if self.alpha is None else self.alpha / self.rank
        return self.strength * a

    def delta(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The dense change of this term alone, shaped [out_rows, *down.shape[1:]] (rows of its slice)."""
        up = self.up.to(device=device, dtype=dtype).flatten(1)
        down = self.down.to(device=device, dtype=dtype)
        d = (up @ down.flatten(1)) * self.scale
        return d.reshape(up.shape[0], *down.shape[1:])


@dataclass
class ModuleDelta:
    terms: list[LoraTerm] = field(default_factory=list)
    diff: torch.Tensor | None = None  # full change of the weight
    diff_b: torch.Tensor | None = None  # change of the bias
    set_weight: torch.Tensor | None = None  # replacement of the weight (e.g. BFL control norm scales)
    adapters: list[Adapter] = field(default_factory=list)  # LoKr / LoHa / DoRA-or-Tucker LoRA patches

    @property
    def rank(self) -> int:
        return sum(t.rank for t in self.terms)

    def is_empty(self) -> bool:
        return (not self.terms and not self.adapters and self.diff is None and self.diff_b is None
                and self.set_weight is None)

    @property
    def is_linear(self) -> bool:
        """True when the change does not depend on the base weight (no DoRA adapter)."""
        return all(a.is_linear for a in self.adapters)

    def types(self) -> list[str]:
        """What the module holds: lora, lokr, loha, dora, diff, diff_b, set (in that order, once each)."""
        kinds = ["lora"] if self.terms else []
        kinds += [a.kind for a in self.adapters]
        kinds += ["dora"] if not self.is_linear else []
        kinds += [k for k, v in (("diff", self.diff), ("diff_b", self.diff_b), ("set", self.set_weight)) if v is not None]
        return list(dict.fromkeys(kinds))

    def apply(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The weight after this module's patches at `strength`, ComfyUI's way (fp32): low-rank terms and
        diffs add, adapters patch their rows (DoRA ones non-linearly), a replacement sets the weight."""
        w = weight.float().clone()
        if self.set_weight is not None:
            return self.set_weight.float().reshape(w.shape).clone()
        if self.terms or self.diff is not None:
            w += self.dense_delta(tuple(w.shape), linear_only=True) * strength
        for a in self.adapters:
            start, length = a.rows if a.rows is not None else (0, w.shape[0])
            w[start : start + length] = a.apply(w[start : start + length], strength)
        return w

    def dense_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device=None,
                    linear_only: bool = False) -> torch.Tensor:
        """ΔW of the weight (not counting `set_weight`), dense, for a weight of `shape`; a DoRA adapter
        (no ΔW without the base weight) raises MismatchError. `linear_only`: terms and diff alone."""
        out = torch.zeros(shape, dtype=dtype, device=device)
        for a in [] if linear_only else self.adapters:
            start, length = a.rows if a.rows is not None else (0, shape[0])
            out[start : start + length] += a.delta((length, *shape[1:]), dtype, device)
        for t in self.terms:
            d = t.delta(dtype, device)
            if t.rows is None:
                out += d.reshape(shape)
            else:
                start, length = t.rows
                out[start : start + length] += d.reshape(length, *shape[1:])
        if self.diff is not None:
            out += self.diff.to(device=device, dtype=dtype).reshape(shape)
        return out


@dataclass
class LoRA:
    modules: dict[str, ModuleDelta] = field(default_factory=dict)
    arch: str = "unknown"  # flux | chroma | sdxl | sd15 | unknown
    source_format: str = "unknown"
    metadata: dict[str, str] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)  # keys of the source file no reader understood

    def module(self, name: str) -> ModuleDelta:
        return self.modules.setdefault(name, ModuleDelta())

    def summary(self) -> dict:
        ranks = [m.rank for m in self.modules.values() if m.terms]
        return {
            "arch": self.arch,
            "format": self.source_format,
            "modules": len(self.modules),
            "lowrank_modules": len(ranks),
            "rank_min": min(ranks) if ranks else 0,
            "rank_max": max(ranks) if ranks else 0,
            "diff_modules": sum(m.diff is not None for m in self.modules.values()),
            **{f"{k}_modules": sum(any(a.kind == k for a in m.adapters) for m in self.modules.values())
               for k in ("lokr", "loha")},
            "dora_modules": sum(not m.is_linear for m in self.modules.values()),
            "bias_modules": sum(m.diff_b is not None for m in self.modules.values()),
            "set_modules": sum(m.set_weight is not None for m in self.modules.values()),
            "unknown_keys": len(self.unknown_keys),
        }
