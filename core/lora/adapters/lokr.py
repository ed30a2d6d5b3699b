"""LoKr (LyCORIS): ΔW = kron(w1, w2) · s, each factor stored whole or as a low-rank pair.

    w1 = lokr_w1                   | lokr_w1_a @ lokr_w1_b
    w2 = lokr_w2                   | lokr_w2_a @ lokr_w2_b | einsum('i j k l, j r, i p -> p r k l', t2, w2_b, w2_a)
    s  = alpha / r when a factor is decomposed (r = w2_b's rows if w2 is, else w1_b's), else 1

exactly ComfyUI 0.3.75's weight_adapter/lokr.py (a conv w2 is 4-D; w1 then gets two unit dims). The
singular values of a Kronecker product are the products of its factors' singular values, so the optimal
rank-R approximation of a LoKr follows from two small SVDs (`best_lowrank`), with no dense ΔW at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import MismatchError
from .base import Adapter, swap_rows


@dataclass(kw_only=True)
class LoKr(Adapter):
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    kind = "lokr"
    ROLES = {"w1": ".lokr_w1", "w1_a": ".lokr_w1_a", "w1_b": ".lokr_w1_b", "w2": ".lokr_w2", "w2_a": ".lokr_w2_a",
             "w2_b": ".lokr_w2_b", "t2": ".lokr_t2"}

    def __post_init__(self):
        if (self.w1 is None) == (self.w1_a is None or self.w1_b is None):
            raise MismatchError("a LoKr needs lokr_w1, or both lokr_w1_a and lokr_w1_b (not both forms)")
        if (self.w2 is None) == (self.w2_a is None or self.w2_b is None):
            raise MismatchError("a LoKr needs lokr_w2, or both lokr_w2_a and lokr_w2_b (not both forms)")

    @property
    def rank(self) -> int | None:
        if self.w2 is None:
            return int(self.w2_b.shape[0])
        if self.w1 is None:
            return int(self.w1_b.shape[0])
        return None

    def factor1(self, dtype=torch.float32, device=None) -> torch.Tensor:
        if self.w1 is not None:
            return self.w1.to(device=device, dtype=dtype)
        return self.w1_a.to(device=device, dtype=dtype) @ self.w1_b.to(device=device, dtype=dtype)

    def factor2(self, dtype=torch.float32, device=None) -> torch.Tensor:
        if self.w2 is not None:
            return self.w2.to(device=device, dtype=dtype)
        a, b = self.w2_a.to(device=device, dtype=dtype), self.w2_b.to(device=device, dtype=dtype)
        if self.t2 is None:
            return a @ b
        return torch.einsum("i j k l, j r, i p -> p r k l", self.t2.to(device=device, dtype=dtype), b, a)

    def product(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        w1, w2 = self.factor1(dtype, device), self.factor2(dtype, device)
        if w2.ndim == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return torch.kron(w1, w2)

    def strength_field(self) -> str:
        return "w1" if self.w1 is not None else "w1_a"

    @property
    def in_features(self) -> int:
        i1 = (self.w1 if self.w1 is not None else self.w1_b).shape[1]
        i2 = self.w2.shape[1] if self.w2 is not None else self.w2_b.shape[1]
        return int(i1) * int(i2)

    @property
    def out_rows(self) -> int:
        o1 = (self.w1 if self.w1 is not None else self.w1_a).shape[0]
        o2 = self.w2.shape[0] if self.w2 is not None else (self.w2_a.shape[0] if self.t2 is None else self.w2_a.shape[1])
        return int(o1) * int(o2)

    def swapped(self) -> LoKr:
        o1 = (self.w1 if self.w1 is not None else self.w1_a).shape[0]
        if o1 % 2:  # rows a·o2 + b: the halves are w1's halves only when o1 is even
            return super().swapped()
        kw = dict(self.__dict__)
        if self.w1 is not None:
            kw["w1"] = swap_rows(self.w1)
        else:
            kw["w1_a"] = swap_rows(self.w1_a)
        return LoKr(**kw)

    def best_lowrank(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(up [out, k], down [k, in], all singular values descending) of the optimal rank-`rank`
        approximation of scale·kron(w1, w2) (k ≤ rank), from the SVDs of w1 and w2 alone (fp64)."""
        w1 = self.factor1(torch.float64)
        w2 = self.factor2(torch.float64)
        w2 = w2.reshape(w2.shape[0], -1)
        u1, s1, v1 = torch.linalg.svd(w1, full_matrices=False)
        u2, s2, v2 = torch.linalg.svd(w2, full_matrices=False)
        sv = (s1[:, None] * s2[None, :]).flatten() * abs(self.scale)
        order = torch.argsort(sv, descending=True)
        keep = order[:rank]
        i, j = keep // s2.shape[0], keep % s2.shape[0]
        root = sv[keep].sqrt()
        sign = -1.0 if self.scale < 0 else 1.0
        # kron(u1[:, i], u2[:, j]) is column i·n2 + j of kron(u1, u2): build only the kept ones
        up = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(-1, len(keep)) * root * sign
        down = (v1[i][:, :, None] * v2[j][:, None, :]).reshape(len(keep), -1) * root[:, None]
        return up, down, sv[order]
