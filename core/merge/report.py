"""The merge report: per key group, how similar the inputs were, how far the result moved from A, which
keys only some inputs had and what every rule did. As JSON, as a text table and as a chart."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..encodings.report import decoded_line, decoded_reads
from ..report import bar_chart, format_table, write_json

if TYPE_CHECKING:
    from .plan import MergePlan


@dataclass(slots=True)  # one per key, and a model can hold 10^5 keys
class KeyStats:
    name: str
    group: str
    action: str
    method: str | None
    numel: int
    reads: list[str] = field(default_factory=list)
    decided_by: str = ""
    sq: list[float] = field(default_factory=list)  # |x_i|² per input read
    dot: list[float] = field(default_factory=list)  # x_A · x_i (index 0 unused)
    change: float = 0.0  # |out − x_A|²
    sampled: bool = False  # the sums cover a sample of the tensor's row blocks
    finite: bool = True  # every output value finite
    nonfinite_inputs: list[str] = field(default_factory=list)


def _cos(dot: float, a: float, b: float) -> float | None:
    if a <= 0 or b <= 0:
        return None
    return dot / math.sqrt(a * b)


@dataclass
class MergeReport:
    plan: MergePlan
    out_path: Path | None
    dtype: str
    device: str
    seconds: float
    bytes_written: int
    key_stats: list[KeyStats]
    stats: str = "sample"
    encodings: dict[str, int] = field(default_factory=dict)  # written tensors per encoding, when any is encoded
    _groups: list[dict] | None = field(default=None, repr=False, compare=False)  # table, chart and JSON share it

    @property
    def labels(self) -> list[str]:
        return [i.label for i in self.plan.inputs]

    def nonfinite_keys(self) -> list[str]:
        return [k.name for k in self.key_stats if not k.finite]

    def groups(self) -> list[dict]:
        """One row per key group, in file order (computed once: a pass over every key)."""
        if self._groups is None:
            self._groups = self._compute_groups()
        return self._groups

    def _compute_groups(self) -> list[dict]:
        order: dict[str, list[KeyStats]] = {}
        for k in self.key_stats:
            order.setdefault(k.group, []).append(k)
        labels = self.labels
        rows = []
        for group, ks in order.items():
            actions = Counter()
            sq = [0.0] * len(labels)
            dot = [0.0] * len(labels)
            change = 0.0
            merged = 0
            for k in ks:
                if k.action == "merge":
                    actions[k.method] += 1
                    if k.sq and len(k.reads) == len(labels):
                        merged += 1
                        for i in range(len(labels)):
                            sq[i] += k.sq[i]
                            dot[i] += k.dot[i]
                        change += k.change
                elif k.action == "take":
                    actions["take " + k.reads[0]] += 1
                else:
                    actions["drop"] += 1
            row = {"group": group, "keys": len(ks), "params": sum(k.numel for k in ks),
                   "actions": ", ".join(f"{a}×{c}" if c > 1 else a for a, c in actions.items())}
            for i, lab in enumerate(labels[1:], 1):
                row[f"cos(A,{lab})"] = _cos(dot[i], sq[0], sq[i]) if merged else None
            row["change"] = math.sqrt(change / sq[0]) if merged and sq[0] > 0 else None
            rows.append(row)
        return rows

    def decoded(self) -> dict[str, dict]:
        """input label -> encoding -> count and keys of the quantized tensors this merge decoded."""
        sources = {i.label: s for i, s in zip(self.plan.inputs, self.plan.sources)}
        reads = ((self.plan.inputs[i].label, raw) for kp in self.plan.keys if kp.action != "drop" for i, raw in kp.reads)
        return decoded_reads(sources, reads)

    def to_dict(self) -> dict:
        counts = Counter(k.action for k in self.key_stats)
        return {
            "output": str(self.out_path) if self.out_path else None,
            "dry_run": self.out_path is None,
            "dtype": self.dtype,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "bytes_written": self.bytes_written,
            "keys": {"merged": counts.get("merge", 0), "taken": counts.get("take", 0), "dropped": counts.get("drop", 0)},
            "plan": self.plan.summary(),
            "groups": self.groups(),
            "stats": self.stats,
            "decoded": self.decoded(),
            "output_encodings": self.encodings,
            "nonfinite_keys": [{"key": k.name, "inputs_with_nonfinite": k.nonfinite_inputs}
                               for k in self.key_stats if not k.finite],
            "keys_detail": [
                {"key": k.name, "group": k.group, "action": k.action, "method": k.method, "reads": k.reads,
                 "decided_by": k.decided_by}
                for k in self.key_stats if k.action != "merge" or k.decided_by != "default"
            ],
        }

    def save_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def table(self) -> str:
        """The human report: plan summary, the per-group table, and warnings."""
        cols = ["group", "keys", "params", "actions"] + [f"cos(A,{lab})" for lab in self.labels[1:]] + ["change"]
        parts = [self.plan.describe()]
        if self.stats != "off":
            rows = [{c: ("-" if r.get(c) is None else r.get(c)) for c in cols} for r in self.groups()]
            how = "every 16th row block of large tensors" if self.stats == "sample" else "every element"
            parts.append(format_table(rows, cols, title=f"per key group (change = ‖out − A‖ / ‖A‖ over merged keys; "
                                                        f"sums over {how})"))
        if line := decoded_line(self.decoded()):
            parts.append(line)
        bad = [k for k in self.key_stats if not k.finite]
        if bad:
            detail = ", ".join(f"{k.name} (inputs: {'+'.join(k.nonfinite_inputs) or 'none; the method'})" for k in bad[:8])
            parts.append(f"WARNING: {len(bad)} merged keys contain NaN/Inf: {detail}")
        if self.encodings:
            parts.append("output tensors: " + ", ".join(f"{n} {e}" for e, n in self.encodings.items())
                         + " (scales recomputed from the merged fp32 weights)")
        where = f"wrote {self.out_path} ({self.bytes_written / 2**20:.1f} MiB)" if self.out_path else "dry run: nothing written"
        parts.append(f"{where} in {self.seconds:.2f} s on {self.device}, dtype {self.dtype}")
        return "\n".join(parts)

    def chart(self, max_groups: int = 60) -> np.ndarray:
        """Per group: 1 − cos(A, X) for each other input, and the relative change of A (log scale)."""
        rows = [r for r in self.groups() if r.get("change") is not None][:max_groups]
        if not rows:
            rows = self.groups()[:max_groups]
        labels = [r["group"] for r in rows]  # the report table's names: one label set
        series: dict[str, list[float]] = {}
        for lab in self.labels[1:]:
            series[f"1-cos(A,{lab})"] = [_floor(1 - r[f"cos(A,{lab})"]) if r.get(f"cos(A,{lab})") is not None else float("nan")
                                         for r in rows]
        series["|out-A|/|A|"] = [_floor(r["change"]) if r.get("change") is not None else float("nan") for r in rows]
        return bar_chart(labels, series, title=f"merge: {self.plan.method}, per key group", ylabel="1 - cos, relative change", log=True)


def _floor(v: float) -> float:
    return max(v, 1e-9)
