"""LoRA pairs the fast low-rank path (`model.LoraTerm`) does not take: with a DoRA magnitude and/or a
LoCon Tucker core (`lora_mid.weight`, conv layers). ΔW = up @ (down ×mid) · alpha / r, r = down's rows,
exactly ComfyUI 0.3.75's weight_adapter/lora.py (`mid` folded into `down` its way)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Adapter, swap_rows


@dataclass(kw_only=True)
class LoCon(Adapter):
    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None = None

    kind = "lora"
    ROLES = {"up": ".lora_up.weight", "down": ".lora_down.weight", "mid": ".lora_mid.weight"}

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def product(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        up = self.up.to(device=device, dtype=dtype)
        down = self.down.to(device=device, dtype=dtype)
        if self.mid is not None:
            mid = self.mid.to(device=device, dtype=dtype)
            shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1)).reshape(shape).transpose(0, 1)
        return up.flatten(1) @ down.flatten(1)

    def strength_field(self) -> str:
        return "up"

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_rows(self) -> int:
        return int(self.up.shape[0])

    def swapped(self) -> LoCon:
        kw = dict(self.__dict__)
        kw["up"] = swap_rows(self.up)
        return LoCon(**kw)
