"""Exact algebra on low-rank factors: slicing terms by rows, fusing several terms into one up/down pair.

Writers need one (up, down, alpha) per file module, while the canonical LoRA may hold several terms per
module (split q/k/v read from diffusers, composed LoRAs, …) and a file module may cover only some rows of
a canonical module (diffusers `to_q` is a third of `qkv`). Everything here is exact: no SVD, no dense ΔW.
"""

from __future__ import annotations

import torch

from .model import LoraTerm


def scatter_up(up: torch.Tensor, rows: tuple[int, int] | None, total: int) -> torch.Tensor:
    """`up` placed at `rows` of a zero [total, r, ...] factor (fp32)."""
    up = up.float()
    if rows is None or (rows[0] == 0 and rows[1] == total):
        return up
    out = up.new_zeros((total, *up.shape[1:]))
    out[rows[0] : rows[0] + rows[1]] = up
    return out


def slice_term(term: LoraTerm, start: int, length: int) -> LoraTerm | None:
    """The part of `term` that falls in rows [start, start+length) of its target, with rows relative to
    that window; None when it does not touch the window."""
    t_start, t_len = term.rows if term.rows is not None else (0, int(term.up.shape[0]))
    lo, hi = max(start, t_start), min(start + length, t_start + t_len)
    if lo >= hi:
        return None
    up = term.up[lo - t_start : hi - t_start]
    rows = None if (lo == start and hi == start + length) else (lo - start, hi - lo)
    return LoraTerm(up=up, down=term.down, alpha=term.alpha, strength=term.strength, rows=rows)


def _base_scale(term: LoraTerm) -> float:
    """alpha / rank without strength: what a loader applies for this term's alpha."""
    return 1.0 if term.alpha is None else term.alpha / term.rank


def _same_downs(terms: list[LoraTerm]) -> bool:
    d0 = terms[0].down
    return all(t.down.shape == d0.shape and (t.down is d0 or torch.equal(t.down, d0)) for t in terms[1:])


def fuse_terms(terms: list[LoraTerm], total_rows: int) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """One (up, down, alpha) with Σ terms' ΔW over `total_rows` rows, exactly.

    Equal downs share one down (rank unchanged); otherwise the downs are stacked and the up is
    block-diagonal (rank = Σ ranks). Strengths are folded into up; alpha is kept when the terms agree on
    their alpha/rank scale, so a plain LoRA passes through with its factors and alpha untouched.
    """
    if not terms:
        raise ValueError("fuse_terms needs at least one term")
    t0 = terms[0]
    if len(terms) == 1 and (t0.rows is None or t0.rows == (0, total_rows)):
        up = t0.up if t0.strength == 1.0 else t0.up.float() * t0.strength
        return up, t0.down, t0.alpha
    if _same_downs(terms):
        ref = _base_scale(t0)
        up = sum(scatter_up(t.up, t.rows, total_rows) * (t.scale / ref) for t in terms)
        return up, t0.down, t0.alpha
    scales = [t.scale for t in terms]
    rank = sum(t.rank for t in terms)
    if all(s == scales[0] for s in scales):
        common, alpha = scales[0], scales[0] * rank  # alpha / rank == the shared scale
    else:
        common, alpha = 1.0, None
    ups = [scatter_up(t.up, t.rows, total_rows) * (t.scale / common) for t in terms]
    down = torch.cat([t.down.float() for t in terms], dim=0)
    up = torch.cat(ups, dim=1)
    return up, down, alpha


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """[a | b] -> [b | a] along rows: diffusers' norm_out (scale, shift) vs BFL adaLN (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def pad_rows(t: torch.Tensor, rows: tuple[int, int], total: int) -> torch.Tensor:
    """A row slice of a full tensor (diff, bias diff) placed into zeros of `total` rows."""
    out = t.new_zeros((total, *t.shape[1:]))
    out[rows[0] : rows[0] + rows[1]] = t
    return out
