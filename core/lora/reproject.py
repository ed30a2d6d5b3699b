"""Opt-in "re-project" Flux -> Chroma conversion, for users who want the seed converter's approach done right.

The exact conversion (`convert.flux_to_chroma`) needs no base model. This mode additionally reshapes each
kept layer's change using the Flux and Chroma base weights, then re-extracts a LoRA of a chosen rank:

- add_difference: (W_flux + ΔW) − W_flux added to Chroma, i.e. ΔW itself; only the re-extraction (rank)
  changes anything. Given for completeness; the exact conversion is the same thing without bases.
- comparative: the comparative-interpolation mask of the two bases (δ = |W_flux − W_chroma|, similarity
  weight ((max δ − δ) / max δ)^(1/α − 1), or the difference weight (δ / max δ)^(1/α − 1) when β = 1;
  mask = lerp(Bernoulli(w), w, γ) from a generator seeded per layer) applied to ΔW only: ΔW ⊙ mask.
- add_dissimilar: per output row, the cosine c between ΔW and the Chroma-vs-Flux shift (W_chroma − W_flux);
  d = ((c + 1) / 2)^γ; ΔW scaled by multiplier · lerp(d, 1 − d, β) (β = 1 keeps what differs from the shift).

Unlike the seed tool: both bases are read one layer at a time (memory-mapped, never whole), only the
LoRA's delta is touched (never whole weights), every random draw is seeded, and the strength is applied
exactly once, before the method. Layers Chroma lacks are dropped and reported as in the exact conversion.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..arch import detect_arch
from ..errors import MismatchError
from ..progress import ProgressFn, no_progress
from ..sources import TensorSource, as_source, diffusion_view
from . import keymaps
from .convert import ConversionReport, flux_to_chroma
from .model import LoRA, LoraTerm, ModuleDelta
from .svd import RankPolicy, low_rank

REPROJECT_METHODS = ("add_difference", "comparative", "add_dissimilar")


@dataclass(frozen=True)
class ReprojectOptions:
    method: str = "add_difference"
    rank: int = 32
    strength: float = 1.0  # applied once, to the LoRA's ΔW, before the method
    alpha: float = 0.5  # comparative: the weight's exponent is 1/alpha − 1 (1 = mask of ones)
    beta: float = 0.0  # comparative: 1 = difference weight; add_dissimilar: 1 = keep dissimilar features
    gamma: float = 1.0  # comparative: 0 = Bernoulli mask, 1 = the weights themselves; add_dissimilar: exponent
    multiplier: float = 1.0  # add_dissimilar
    seed: int = 0
    svd_method: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in REPROJECT_METHODS:
            raise ValueError(f"unknown re-project method {self.method!r}; choose one of {', '.join(REPROJECT_METHODS)}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1] (got {self.alpha})")
        if self.rank < 1:
            raise ValueError(f"rank must be ≥ 1 (got {self.rank})")


def _generator(seed: int, key: str, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**62))
    return g


def comparative_mask(w_flux: torch.Tensor, w_chroma: torch.Tensor, opts: ReprojectOptions, gen: torch.Generator) -> torch.Tensor:
    delta = (w_flux - w_chroma).abs()
    top = float(delta.max()) if delta.numel() else 0.0
    if top == 0.0 or opts.alpha == 1.0:
        return torch.ones_like(delta)
    rel = delta / top if opts.beta == 1.0 else (top - delta) / top
    weight = rel.pow(1.0 / opts.alpha - 1.0)
    drawn = torch.bernoulli(weight, generator=gen)
    return torch.lerp(drawn, weight, opts.gamma)


def dissimilarity_scale(delta: torch.Tensor, shift: torch.Tensor, opts: ReprojectOptions) -> torch.Tensor:
    """Per-row factor multiplier · lerp(d, 1 − d, β), d = ((cos(ΔW_row, shift_row) + 1) / 2)^γ."""
    a, b = delta.reshape(delta.shape[0], -1), shift.reshape(shift.shape[0], -1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    d = ((cos + 1.0) / 2.0).pow(opts.gamma)
    return opts.multiplier * torch.lerp(d, 1.0 - d, opts.beta)


def reproject_delta(delta: torch.Tensor, w_flux: torch.Tensor, w_chroma: torch.Tensor, key: str,
                    opts: ReprojectOptions) -> torch.Tensor:
    """The change to give Chroma's weight for one layer (all fp32, same device)."""
    if opts.method == "add_difference":
        return delta
    if opts.method == "comparative":
        return delta * comparative_mask(w_flux, w_chroma, opts, _generator(opts.seed, key, delta.device))
    scale = dissimilarity_scale(delta, w_chroma - w_flux, opts)
    return delta * scale.reshape(-1, *([1] * (delta.ndim - 1)))


def _checked_bases(flux_base, chroma_base) -> tuple[TensorSource, TensorSource]:
    flux, chroma = diffusion_view(as_source(flux_base)), diffusion_view(as_source(chroma_base))
    fa, ca = detect_arch(flux), detect_arch(chroma)
    if not fa.arch.startswith("flux") or fa.naming != "bfl":
        raise MismatchError(f"{flux.name}: the Flux base must be a Flux dev/schnell model with BFL names (found {fa})")
    if ca.arch != "chroma" or ca.naming != "bfl":
        raise MismatchError(f"{chroma.name}: the Chroma base must be a Chroma model with BFL names (found {ca})")
    return flux, chroma


@torch.no_grad()
def reproject_flux_to_chroma(
    lora: LoRA,
    flux_base,
    chroma_base,
    opts: ReprojectOptions = ReprojectOptions(),
    device: str | torch.device = "cpu",
    progress: ProgressFn = no_progress,
) -> tuple[LoRA, ConversionReport]:
    """Flux LoRA -> Chroma LoRA through both base models, one layer at a time, re-extracted at `opts.rank`.
    The report is the exact conversion's (applied / dropped / unknown) plus, per module, how much the
    method changed ΔW and the re-extraction error."""
    remapped, report = flux_to_chroma(lora)
    flux, chroma = _checked_bases(flux_base, chroma_base)
    out = LoRA(arch="chroma", source_format=remapped.source_format, unknown_keys=list(remapped.unknown_keys),
               metadata={**remapped.metadata, "weightsmith.reproject": opts.method, "weightsmith.reproject_seed": str(opts.seed)})
    dev = torch.device(device)
    names = sorted(remapped.modules)
    details: dict[str, dict] = {}
    for i, name in enumerate(names):
        mod = remapped.modules[name]
        if not name.startswith(keymaps.DIFFUSION):
            out.modules[name] = _scaled(mod, opts.strength)  # text encoders: no base to re-project against
            progress(i + 1, len(names))
            continue
        key = keymaps.weight_key(name)
        for src in (flux, chroma):
            if key not in src:
                raise MismatchError(f"{src.name}: has no {key!r}, which the LoRA changes")
        shape = tuple(chroma.info(key).shape)
        if tuple(flux.info(key).shape) != shape:
            raise MismatchError(f"{key}: Flux base {tuple(flux.info(key).shape)} and Chroma base {shape} differ in shape")
        if mod.is_linear:
            delta = mod.dense_delta(shape, device=dev) * opts.strength
        else:  # DoRA: its change is defined against the Flux base it was trained on
            w_flux = flux.get(key).to(dev, torch.float32)
            delta = mod.apply(w_flux, opts.strength) - w_flux
        new = reproject_delta(delta, flux.get(key).to(dev, torch.float32), chroma.get(key).to(dev, torch.float32),
                              key, opts)
        result = ModuleDelta(diff_b=None if mod.diff_b is None else mod.diff_b.float() * opts.strength,
                             set_weight=mod.set_weight)
        norm = float(new.norm()) or 1.0
        if new.ndim >= 2:
            lr = low_rank(new.reshape(shape[0], -1), RankPolicy("fixed", opts.rank), method=opts.svd_method,
                          seed=(opts.seed * 7919 + zlib.crc32(key.encode())) % (2**62))
            if lr.rank:
                result.terms.append(LoraTerm(up=lr.up.reshape(shape[0], lr.rank, *([1] * (len(shape) - 2))).cpu(),
                                             down=lr.down.reshape(lr.rank, *shape[1:]).cpu(), alpha=float(lr.rank)))
            err = float((new.reshape(shape[0], -1) - lr.up @ lr.down).norm()) / norm
        else:
            result.diff = new.cpu()
            err = 0.0
        if not result.is_empty():
            out.modules[name] = result
        changed = float((new - delta).norm()) / (float(delta.norm()) or 1.0)
        details[name] = {"method_change": changed, "reextraction_error": err,
                         "rank": result.rank}
        progress(i + 1, len(names))
    report.details = details
    return out, report


def _scaled(mod: ModuleDelta, strength: float) -> ModuleDelta:
    terms = [LoraTerm(t.up, t.down, t.alpha, t.strength * strength, t.rows) for t in mod.terms]
    return ModuleDelta(terms=terms, diff=None if mod.diff is None else mod.diff.float() * strength,
                       diff_b=None if mod.diff_b is None else mod.diff_b.float() * strength, set_weight=mod.set_weight,
                       adapters=[a.with_strength(strength) for a in mod.adapters])
