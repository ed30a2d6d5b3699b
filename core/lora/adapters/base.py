"""What every adapter type shares: alpha, strength, the row slice it covers, an optional DoRA magnitude,
and how its change lands on a weight (ComfyUI's `calculate_weight` for one patch).

A type module (`lokr`, `loha`, `locon`) defines the factors, `product()` — the unscaled ΔW exactly as
ComfyUI computes it before `alpha / rank` — and `rank` (the r of alpha / r, None when the type applies no
alpha scale). Plain low-rank pairs stay `model.LoraTerm` (the fast, factor-only path compose, extraction
and re-rank are built on); an adapter is everything else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from ...errors import MismatchError
from .dora import weight_decompose


@dataclass(kw_only=True)
class Adapter(ABC):
    alpha: float | None = None
    strength: float = 1.0
    rows: tuple[int, int] | None = None  # (start, length) of the target's rows; None: all rows
    dora_scale: torch.Tensor | None = None

    kind = "adapter"
    ROLES: ClassVar[dict[str, str]] = {}  # field -> key suffix in files (`.lokr_w1`)

    # --- per type ------------------------------------------------------------------------------
    @property
    @abstractmethod
    def rank(self) -> int | None:
        """The r of alpha / r; None when the type applies no alpha scale."""

    @abstractmethod
    def product(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The unscaled ΔW, exactly as ComfyUI computes it before alpha / rank."""

    @property
    @abstractmethod
    def out_rows(self) -> int:
        """Rows of ΔW (of the row slice, for a fused target)."""

    @property
    @abstractmethod
    def in_features(self) -> int:
        """Input width of the weight (its second dimension)."""

    def swapped(self) -> Adapter:
        """The same adapter with its two row halves of ΔW exchanged (diffusers norm_out vs BFL adaLN). A DoRA
        magnitude stays as it is: ComfyUI swaps the change (its key map's function) but multiplies by
        dora_scale unswapped, and a file must patch what ComfyUI patches from the original."""
        raise MismatchError(f"a {self.kind} adapter cannot be stored with its row halves swapped")

    # --- shared --------------------------------------------------------------------------------
    @property
    def alpha_scale(self) -> float:
        r = self.rank
        return 1.0 if self.alpha is None or r is None else self.alpha / r

    @property
    def scale(self) -> float:
        return self.strength * self.alpha_scale

    @property
    def is_linear(self) -> bool:
        """True when ΔW does not depend on the base weight (no DoRA)."""
        return self.dora_scale is None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The factors by file suffix (absent optional factors left out)."""
        return {suffix: getattr(self, f) for f, suffix in self.ROLES.items() if getattr(self, f) is not None}

    @abstractmethod
    def strength_field(self) -> str:
        """The factor a strength can be folded into (ΔW is linear in it)."""

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The factors to store, strength folded in (a DoRA strength is not linear: refused unless 1)."""
        out = self.tensors()
        if self.strength != 1.0:
            if not self.is_linear:
                raise MismatchError(f"a {self.kind} adapter with a DoRA magnitude at strength {self.strength:g} cannot "
                                    "be stored (the strength acts on the DoRA-scaled weight, not on the factors)")
            f = self.strength_field()
            out[self.ROLES[f]] = getattr(self, f).float() * self.strength
        return out

    def with_strength(self, strength: float) -> Adapter:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw["strength"] = self.strength * strength
        return type(self)(**kw)

    def delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """strength · alpha/r · product, shaped `shape` (the rows it covers). Refused for DoRA."""
        if not self.is_linear:
            raise MismatchError(f"a {self.kind} adapter with a DoRA magnitude has no change of its own: it depends "
                                "on the base weight (give the base model, or keep the module as it is)")
        return (self.product(dtype, device) * self.scale).reshape(shape)

    def apply(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The weight (slice) after this patch, exactly as ComfyUI computes it (fp32)."""
        s = strength * self.strength
        diff = self.product(torch.float32, weight.device).reshape(weight.shape)
        if self.dora_scale is not None:
            return weight_decompose(self.dora_scale, weight, diff, self.alpha_scale, s)
        return weight.float() + diff * (s * self.alpha_scale)

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors().values()) + (0 if self.dora_scale is None else self.dora_scale.numel())

    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype


def swap_rows(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)
