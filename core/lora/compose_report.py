"""The report of a compose / re-rank: per module the inputs, kind, ranks and (re-compress mode) the error
against the exact composition; overall the mode, inputs, warnings and time, as text or JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..report import format_table
from .budget import format_size


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


@dataclass
class ComposeReport:
    mode: str
    inputs: list[dict]
    modules: list[ModuleReport]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    budget: dict = field(default_factory=dict)  # the size budget's allocation (compose_budget), if any

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
        out = {**self.summary(), "per_module": [m.__dict__ for m in self.modules]}
        if self.budget:
            out["budget"] = {k: v for k, v in self.budget.items() if k != "lines"}
        return out

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
        head += self.budget.get("lines", [])
        head += [f"warning: {w}" for w in self.warnings]
        title = "per module" if len(self.modules) <= limit else f"per module ({limit} worst of {len(self.modules)})"
        return "\n".join(head) + "\n\n" + title + "\n" + self.table(limit)


def mode_name(rank: int | None, energy: float | None, size: int | None = None) -> str:
    parts = ([f"rank {rank}"] if rank is not None else []) + ([f"energy {energy:g}"] if energy is not None else [])
    parts += [f"size {format_size(size)}"] if size is not None else []
    return ", ".join(parts) or "exact"
