"""LoHa (LyCORIS): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r, r = w1_b's rows; conv LoHa with Tucker
cores t1/t2 builds each side as einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a) — exactly ComfyUI
0.3.75's weight_adapter/loha.py.

Without Tucker cores a LoHa is exactly a low-rank product of rank r1·r2 (face-splitting products of the
factors: row o of U is w1_a[o] ⊗ w2_a[o], column i of V is w1_b[:, i] ⊗ w2_b[:, i]), so its optimal
rank-R approximation comes from the factors alone (`lowrank_factors` + `lowrank.recompress`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Adapter, swap_rows

_TUCKER = "i j k l, j r, i p -> p r k l"


@dataclass(kw_only=True)
class LoHa(Adapter):
    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    kind = "loha"
    ROLES = {"w1_a": ".hada_w1_a", "w1_b": ".hada_w1_b", "w2_a": ".hada_w2_a", "w2_b": ".hada_w2_b",
             "t1": ".hada_t1", "t2": ".hada_t2"}

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    def _side(self, a, b, t, dtype, device) -> torch.Tensor:
        a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        if t is None:
            return a @ b
        return torch.einsum(_TUCKER, t.to(device=device, dtype=dtype), b, a)

    def product(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        return (self._side(self.w1_a, self.w1_b, self.t1, dtype, device)
                * self._side(self.w2_a, self.w2_b, self.t2, dtype, device))

    def strength_field(self) -> str:
        return "w1_a"

    @property
    def in_features(self) -> int:
        return int(self.w1_b.shape[1])

    @property
    def out_rows(self) -> int:
        return int(self.w1_a.shape[1] if self.t1 is not None else self.w1_a.shape[0])

    def swapped(self) -> LoHa:
        if self.t1 is not None:
            return super().swapped()
        kw = dict(self.__dict__)
        kw["w1_a"], kw["w2_a"] = swap_rows(self.w1_a), swap_rows(self.w2_a)
        return LoHa(**kw)

    def lowrank_factors(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U [out, r1·r2], V [r1·r2, in]) with U @ V == scale · ΔW (flattened), or None with Tucker cores."""
        if self.t1 is not None:
            return None
        a1, a2 = self.w1_a.to(dtype), self.w2_a.to(dtype)
        b1, b2 = self.w1_b.to(dtype).flatten(1), self.w2_b.to(dtype).flatten(1)
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1) * self.scale
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        return up, down
