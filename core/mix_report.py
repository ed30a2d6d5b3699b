"""The lossless mix report: statistics accumulated chunk by chunk while mixing (`ChunkStats`), summed per
key group and block (`Totals`), and presented as rows, a text table, JSON and a chart (`MixReport`).

Rows hold, per group: cosine similarity of each candidate to the reference a, the share of elements
taken from each, exact ties, mean |change| vs a, and for two candidates how well a is explained as a
blend of them (a weighted-sum reference is equidistant from its parts, so the picks then say nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .encodings.report import decoded_line
from .report import bar_chart, format_table

GROUPS = ("unet", "te", "vae")  # what `include` may name; 'other' (schedules, ids…) is always copied from a


class ChunkStats:
    """Sums for the report, accumulated chunk by chunk (in Python floats, i.e. fp64). The shares taken
    from each candidate cost one pass over a bool mask and are always counted; `full` adds cosines and
    the mean |change| (six more passes: asked for by dry runs, optional on real runs)."""

    def __init__(self, n: int, full: bool = True):
        self.full = full
        self.dot = [0.0] * n  # a·x_i
        self.sq = [0.0] * n  # x_i·x_i
        self.aa = 0.0
        self.taken = [0] * n
        self.ties = 0  # elements where both candidates are exactly as far (two candidates only)
        self.bc = 0.0  # b·c (two candidates only): with the dots above, how far a is from a blend of b, c
        self.nonfinite = False  # some distance was NaN/Inf: an input holds NaN/Inf here
        self.abs_change = 0.0
        self.elements = 0
        self.amax = 0.0  # max |pick| over finite values, for a key written encoded (its scale)

    def reference(self, a32: torch.Tensor) -> None:
        self.aa += float(torch.dot(a32, a32))
        self.elements += a32.numel()

    def candidate(self, i: int, a32: torch.Tensor, x32: torch.Tensor) -> None:
        self.dot[i] += float(torch.dot(a32, x32))
        self.sq[i] += float(torch.dot(x32, x32))

    def merge(self, o: ChunkStats) -> None:
        self.full = o.full
        self.aa += o.aa
        self.elements += o.elements
        self.abs_change += o.abs_change
        self.ties += o.ties
        self.bc += o.bc
        self.nonfinite = self.nonfinite or o.nonfinite
        for i in range(len(o.dot)):
            self.dot[i] += o.dot[i]
            self.sq[i] += o.sq[i]
            self.taken[i] += o.taken[i]

    def check(self, distance: torch.Tensor) -> None:
        """One reduction instead of an isfinite pass per input: a NaN/Inf in a or x makes |a − s·x|
        NaN/Inf, and amax propagates both."""
        if not self.nonfinite and not math.isfinite(float(torch.amax(distance))):
            self.nonfinite = True


LOSSLESS_PLAIN = "every output element is one candidate's own stored value (converted to the output dtype)"
LOSSLESS_DECODED = ("some inputs are quantized: distances are compared on decoded (dequantized) values, and every "
                    "output element is exactly one candidate's decoded value (converted to the output dtype); the "
                    "quantized payloads and their scales are not copied, so a quantized candidate's element is "
                    "its fp8 value times its scale")


@dataclass
class MixReport:
    mode: str
    scales: list[float]
    names: list[str]  # a, then each candidate
    out: Path | None
    dry_run: bool
    device: str
    rows: list[dict]  # per component group and per block: cosines, fractions taken, mean |change|
    keys_mixed: int
    copied: dict[str, list[str]]  # reason -> keys kept from a
    details: dict[str, str]  # key -> why (missing from whom, mismatching shapes)
    extra: dict[str, list[str]]
    out_dtypes: dict[str, int]
    seconds: float = 0.0
    nonfinite: dict[str, list[str]] = field(default_factory=dict)  # input -> mixed keys holding NaN/Inf
    decoded: dict[str, dict] = field(default_factory=dict)  # input -> encoding -> quantized keys decoded
    notes: list[str] = field(default_factory=list)  # how inputs were read (a checkpoint container, stray keys)
    tie_warning: str = ""  # from a sampled check where this run computed no statistics (see sampled_tie_warning)

    def columns(self) -> list[str]:
        """The table's columns, leaving out statistics that were not computed (NaN in every row)."""
        letters = candidate_letters(len(self.names) - 1)
        cols = [f"cos a~{x}" for x in letters] + [f"from {x}" for x in letters] + ["ties", "mean |change|"]
        return ["group", "keys", "elements"] + [c for c in cols if any(not _nan(r.get(c)) for r in self.rows)]

    def to_json(self) -> dict:
        return {
            "mode": self.mode, "scales": self.scales, "inputs": self.names,
            "output": str(self.out) if self.out else None, "dry_run": self.dry_run, "device": self.device,
            "keys_mixed": self.keys_mixed, "kept_from_a": self.copied, "kept_details": self.details,
            "extra_keys_ignored": self.extra, "output_dtypes": self.out_dtypes, "groups": self.rows,
            "nonfinite_inputs": self.nonfinite, "notes": self.notes,
            "tie_warning": self.tie_warning or tie_warning(self.rows[0] if self.rows else {}, self.scales, self.mode),
            "decoded": self.decoded,
            "lossless_means": LOSSLESS_DECODED if self.decoded else LOSSLESS_PLAIN,
            "seconds": round(self.seconds, 3),
        }

    def table(self) -> str:
        return format_table(self.rows, self.columns())

    def text(self) -> str:
        letters = candidate_letters(len(self.names) - 1)
        rule = "nearest to a" if self.mode == "min" else "farthest from a"
        lines = [f"lossless mix ({self.mode}: per element the candidate {rule}"
                 f"{', scales ' + ', '.join(f'{s:g}' for s in self.scales) if any(s != 1 for s in self.scales) else ''})",
                 f"a = {_shown(self.names[0])}"]
        lines += [f"{x} = {_shown(n)}" for x, n in zip(letters, self.names[1:])]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(self.table())
        top = self.rows[0] if self.rows else {}
        if warning := self.tie_warning or tie_warning(top, self.scales, self.mode):
            lines.append(warning)
        for x in letters:
            share = top.get(f"from {x}", float("nan"))
            if share >= 0.999:
                lines.append(f"note: {x} supplied {share:.1%} of the elements ({top['group']}): the mix is nearly "
                             f"{x} itself.")
        lines.append(f"{self.keys_mixed} keys mixed" + "".join(
            f"; {len(v)} kept from a ({reason})" for reason, v in self.copied.items() if v))
        for k, why in list(self.details.items())[:8]:
            lines.append(f"  kept {k}: {why}")
        if len(self.details) > 8:
            lines.append(f"  … and {len(self.details) - 8} more (see the JSON report)")
        for name, keys in self.extra.items():
            lines.append(f"{len(keys)} keys of {name} have no counterpart in a (ignored), e.g. {keys[0]}")
        if self.decoded:
            lines.append(decoded_line(self.decoded))
            lines.append("note: " + LOSSLESS_DECODED)
        for name, keys in self.nonfinite.items():
            lines.append(f"warning: {len(keys)} tensors of {name} hold NaN/Inf, e.g. {keys[0]} (picks there "
                         "follow the NaN rule: min keeps b, max takes c)")
        encoded = {k: n for k, n in self.out_dtypes.items() if k.startswith(("fp8_scaled", "comfy_quant"))}
        if encoded and not self.dry_run:
            lines.append(f"note: {', '.join(f'{n} tensors written as {k}' for k, n in encoded.items())}: a fresh scale "
                         "per tensor over the picked (decoded) values, so each element is its model's value within "
                         "fp8 rounding, not bit for bit")
        lines.append(("dry run: nothing written" if self.dry_run else f"wrote {self.out}")
                     + f" in {self.seconds:.1f}s on {self.device}")
        return "\n".join(lines)

    def chart(self) -> np.ndarray:
        """Per block: cosine similarity of each candidate to a, and the fraction of elements taken from it."""
        rows = [r for r in self.rows if r["group"] != "unet"] or self.rows  # the unet total is its blocks' sum
        letters = candidate_letters(len(self.names) - 1)
        names = [f"cos a~{x}" for x in letters] + [f"from {x}" for x in letters]
        series = {c: [r[c] for r in rows] for c in names if c in self.columns()}
        if not series:  # a plan-only report: how many keys each block mixes
            series = {"keys mixed": [r["keys"] for r in rows]}
        title = f"lossless mix ({self.mode}){' - dry run' if self.dry_run else ''}: similarity and share per block"
        labels = [r["group"] for r in rows]  # the report table's names: one label set
        return bar_chart(labels, dict(list(series.items())[:6]), title=title)


def tie_warning(row: dict, scales: list[float], mode: str, where: str = "") -> str:
    """The warning for picks the models do not decide (two candidates): a reference that is a blend of b and c
    (a weighted-sum reference, compared unscaled) is equidistant from both or nearer one of them in every
    element. Empty when `row` (a report row with statistics) shows none. (Exact ties alone are no sign: where
    b and c hold the same value, as fine-tunes of one base often do, a tie picks that value either way.)"""
    tie_takes = "b" if mode == "min" else "c"
    if row.get("blend_residual", 1.0) < 0.01 and all(s == 1 for s in scales):
        r = row["blend_ratio"]
        return (f"WARNING: a is almost exactly a blend of b and c (a ≈ {r:.2f}·b + {1 - r:.2f}·c in "
                f"{row['group']}). Such a reference is equidistant from both (ratio 0.5) or nearer one of them in "
                f"every element, so the picks are decided by ties (which take {tie_takes}) and rounding, not by the "
                "models. Bias the comparison with alpha ≠ beta (e.g. 1.0 and 0.9), or use a reference that is not "
                f"a blend of the candidates.{where}")
    return ""


SAMPLE_ELEMENTS = 1 << 22  # what the sampled tie check reads per model: a few tensors, a fraction of a second


def sampled_tie_warning(reference, candidates, scales: list[float], mode: str, include=("unet",),
                        device="cpu", budget: int = SAMPLE_ELEMENTS) -> str:
    """`tie_warning` from statistics over a sample of the mixed tensors (spread over the model, about
    `budget` elements): for runs that compute no statistics of their own, so a tie-decided mix is named in
    every run, not only in dry runs. Inputs: what `plan_mix` takes (paths, dicts, TensorSources)."""
    if len(candidates) != 2:
        return ""
    from .mix import MixPlan, execute_mix, plan_mix
    from .sources import as_source

    a, cands = as_source(reference), [as_source(c) for c in candidates]
    plan = plan_mix(a, cands, include=include, out_dtype=torch.float32)
    mixed = plan.mixed()
    if not mixed:
        return ""
    sample, total = [], 0
    for k in mixed[:: max(1, len(mixed) // 64)]:  # keys from every part of the model, as long as the budget lasts
        n = math.prod(k.shape)
        if total + n <= budget:
            sample.append(k)
            total += n
    if not sample:  # every tensor is larger than the budget: the smallest one
        sample = [min(mixed, key=lambda k: math.prod(k.shape))]
        total = math.prod(sample[0].shape)
    report = execute_mix(MixPlan(sample, plan.names, {}), a, cands, scales, mode, dry_run=True, device=device,
                         stats=True)
    row = next((r for r in report.rows if r["group"] == "unet"), report.rows[0] if report.rows else {})
    return tie_warning(row, scales, mode, where=f" (Checked on a sample: {len(sample)} tensors, {total:,} elements.)")


def _blend(s: ChunkStats) -> tuple[float, float]:
    """(r, residual) of the least-squares fit a ≈ r·b + (1 − r)·c, from the accumulated dots; residual is
    the share of |a − c|² the blend leaves unexplained (0: a is exactly a blend of b and c)."""
    ac2 = s.aa - 2 * s.dot[1] + s.sq[1]  # |a − c|²
    bc2 = s.sq[0] - 2 * s.bc + s.sq[1]  # |b − c|²
    cross = s.dot[0] - s.dot[1] - s.bc + s.sq[1]  # (a − c)·(b − c)
    if ac2 <= 0 or bc2 <= 0:
        return float("nan"), float("nan")
    return cross / bc2, max(0.0, 1.0 - cross * cross / (ac2 * bc2))


def _shown(name: str) -> str:
    """A file input by its file name; a node's input as the node names it (`model_a: … (#3)`, kept whole)."""
    return name if ": " in name else Path(name).name


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def candidate_letters(n: int) -> list[str]:
    """The report's names for the candidates: b, c, d, …"""
    return [chr(ord("b") + i) if i < 25 else f"m{i}" for i in range(n)]


class Totals:
    """The statistics of every key of one report row (a component group or a block)."""

    def __init__(self, n: int):
        self.keys = 0
        self.s = ChunkStats(n)

    def add(self, s: ChunkStats | None) -> None:
        self.keys += 1
        if s is not None:
            self.s.merge(s)

    def row(self, label: str, letters: list[str]) -> dict:
        s = self.s
        row: dict = {"group": label, "keys": self.keys, "elements": s.elements}
        nan = float("nan")
        for i, x in enumerate(letters):
            den = math.sqrt(s.aa) * math.sqrt(s.sq[i])
            row[f"cos a~{x}"] = s.dot[i] / den if s.full and den > 0 else nan
        for i, x in enumerate(letters):
            row[f"from {x}"] = s.taken[i] / s.elements if s.elements else nan
        row["mean |change|"] = s.abs_change / s.elements if s.full and s.elements else nan
        row["ties"] = s.ties / s.elements if s.full and s.elements and len(letters) == 2 else nan
        if s.full and len(letters) == 2:
            row["blend_ratio"], row["blend_residual"] = _blend(s)
        return row
