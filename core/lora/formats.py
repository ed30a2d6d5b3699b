"""LoRA files in and out: format detection, `load_lora` to the canonical LoRA, `lora_state_dict` /
`save_lora` in any writable format.

The formats themselves are small reader/writer functions registered in `FORMATS` by
`formats_kohya` (comfy, kohya, onetrainer) and `formats_peft` (diffusers, xlabs, bfl_control, peft_bfl).
Every key a reader does not understand is kept by name in `LoRA.unknown_keys`; nothing is dropped silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..arch import arch_family
from ..errors import BadFileError, MismatchError
from ..report import an_arch
from ..safetensors_io import write_safetensors
from ..sources import DictSource, TensorSource, as_source, open_model
from . import formats_diffsynth, formats_kohya, formats_peft  # noqa: F401  (they register the formats)
from . import keymaps as km
from . import keymaps_flux2 as f2
from . import keymaps_hidream as hd
from . import keymaps_lumina2 as lu
from . import keymaps_sd3 as s3
from .formats_base import FORMATS, Format, UnwritableError, check_modules, register, unwritable_error, unwritable_in
from .model import LoRA

BASE_ARCH_META = "weightsmith.base_arch"  # the model an extracted LoRA came from (flux-dev, flux-schnell, …)

WRITABLE_FORMATS = ("comfy", "kohya", "diffusers", "onetrainer", "lycoris")
LORA_ARCHES = ("flux", "chroma", "sdxl", "sd15", "qwen-image", "wan", "flux2", "lumina2", "hidream", "sd3")
# When two formats match equally many keys, the more specific one wins.
_PRIORITY = ("xlabs", "bfl_control", "peft_bfl", "onetrainer", "lycoris", "kohya", "diffsynth", "diffusers", "comfy")

__all__ = ["FORMATS", "Format", "LORA_ARCHES", "UnwritableError", "WRITABLE_FORMATS", "check_writable", "detect_format",
           "infer_arch", "load_lora", "lora_state_dict", "lora_summary", "normalize_arch", "read_back", "reformat_lora",
           "register", "save_lora", "unwritable_modules"]


def detect_format(keys: Iterable[str]) -> str:
    """The format whose naming matches most keys ('unknown' when none does)."""
    keys = list(keys)
    scores = {name: FORMATS[name].detect(keys) for name in _PRIORITY if name in FORMATS}
    for name, fmt in FORMATS.items():
        scores.setdefault(name, fmt.detect(keys))
    best = max(scores.values(), default=0)
    if best <= 0:
        return "unknown"
    return next(name for name, s in scores.items() if s == best)


def normalize_arch(arch: str | None) -> str | None:
    """User spellings -> LoRA architecture: flux-dev/flux-schnell/flux -> flux, sd1.5 -> sd15, …"""
    if arch is None:
        return None
    a = arch.strip().lower().replace("_", "-")
    if a in ("", "auto", "unknown"):
        return None
    if a.replace(".", "").replace("-", "").startswith("flux2"):
        return "flux2"
    if a.startswith("flux"):
        return "flux"
    if a.startswith("qwen"):
        return "qwen-image"
    if a.startswith("wan"):
        return "wan"
    a = {"sd1.5": "sd15", "sd-1.5": "sd15", "sd1": "sd15", "sd-xl": "sdxl"}.get(a, a)
    if a not in LORA_ARCHES:
        raise ValueError(f"unknown LoRA architecture {arch!r}; choose one of {', '.join(LORA_ARCHES)}")
    return a


class _Subset(TensorSource):
    """Some keys of another source (what the first reader left over, offered to the next one)."""

    def __init__(self, base: TensorSource, keys: list[str]):
        super().__init__()
        self.base, self.name, self.metadata = base, base.name, base.metadata
        self._infos = {k: base.info(k) for k in keys}

    def _load(self, key: str) -> torch.Tensor:
        return self.base.get(key)


def _merge_into(lora: LoRA, other: LoRA) -> None:
    for name, mod in other.modules.items():
        mine = lora.module(name)
        mine.terms.extend(mod.terms)
        mine.adapters.extend(mod.adapters)
        for role in ("diff", "diff_b"):
            v = getattr(mod, role)
            if v is not None:
                cur = getattr(mine, role)
                setattr(mine, role, v if cur is None else cur.float() + v.float())
        if mod.set_weight is not None:
            mine.set_weight = mod.set_weight


def load_lora(src: str | os.PathLike | TensorSource | Mapping[str, torch.Tensor], arch: str | None = None) -> LoRA:
    """Read a LoRA file (or state dict / source) of any known format into the canonical LoRA.

    `arch` (flux | chroma | sdxl | sd15) overrides detection; a LoRA whose modules contradict it raises
    MismatchError. Keys no reader understands end up in `lora.unknown_keys`.
    """
    if isinstance(src, (str, os.PathLike)):
        # A LoRA file is remapped, not computed on: scanning every value for NaN/Inf here would cost more than
        # the whole conversion (`weightsmith inspect` checks it). A source passed in keeps its own policy.
        source = open_model(src, nonfinite="ignore")
    else:
        source = as_source(src)
    hint = normalize_arch(arch)
    keys = source.keys()
    fmt = detect_format(keys)
    if fmt == "unknown":
        raise BadFileError(_not_a_lora(source))
    recorded = source.metadata.get("weightsmith.format")
    if recorded in FORMATS and recorded != fmt and _recorded_score(recorded, keys) >= FORMATS[fmt].detect(keys):
        fmt = recorded  # same names in two formats (OneTrainer SD = kohya): the writer's word decides
    lora = FORMATS[fmt].read(source, hint)
    # A file may mix spellings (kohya UNet + diffusers text encoder, …): offer the rest to the other readers.
    tried = {fmt}
    while lora.unknown_keys:
        rest = list(lora.unknown_keys)
        scores = {n: f.detect(rest) for n, f in FORMATS.items() if n not in tried}
        nxt = max(scores, key=lambda n: scores[n], default=None)
        if nxt is None or scores[nxt] <= 0:
            break
        tried.add(nxt)
        extra = FORMATS[nxt].read(_Subset(source, rest), hint)
        if len(extra.unknown_keys) >= len(rest):
            continue
        _merge_into(lora, extra)
        lora.unknown_keys = extra.unknown_keys
    check_modules(lora, source.name)
    if not lora.modules:
        foreign = _foreign_adapter(lora.unknown_keys or keys)
        if foreign:
            raise BadFileError(f"{source.name}: holds {foreign[1]} adapter keys (e.g. {foreign[0]}), a type weightsmith "
                               "does not read (it reads LoRA, LoKr, LoHa, DoRA and full diffs); ComfyUI may still load "
                               "the file as it is")
        raise BadFileError(f"{source.name}: read as {fmt} but no key names a known layer "
                           f"(e.g. {', '.join(sorted(keys)[:3])}); is it a LoRA for another architecture?")
    lora.arch = _checked_arch(lora, hint, source.name)
    return lora


def _recorded_score(fmt: str, keys: list[str]) -> int:
    spec = FORMATS[fmt]
    return (spec.detect_recorded or spec.detect)(keys)


def _foreign_adapter(keys: Iterable[str]) -> tuple[str, str] | None:
    """(key, type) of the first key whose suffix is an adapter type we do not read."""
    from .adapters import looks_like

    for k in keys:
        kind = looks_like(k)
        if kind:
            return k, kind
    return None


def _not_a_lora(source: TensorSource) -> str:
    from ..arch import detect_arch

    info = detect_arch(source)
    if info.arch != "unknown":
        return f"{source.name}: this is a full {info.arch} model, not a LoRA; give a LoRA file"
    if not len(source):
        return f"{source.name}: holds no tensors at all; give a LoRA file (an empty download?)"
    foreign = _foreign_adapter(source.keys())
    if foreign:
        return (f"{source.name}: holds {foreign[1]} adapter keys (e.g. {foreign[0]}), a type weightsmith does not read "
                "(it reads LoRA, LoKr, LoHa, DoRA and full diffs)")
    sample = ", ".join(sorted(source.keys())[:4])
    known = ", ".join(FORMATS)
    return (f"{source.name}: no known LoRA format ({known}) matches its keys (e.g. {sample}); give a LoRA file "
            "(`weightsmith inspect` shows what a file holds)")


def infer_arch(lora: LoRA) -> str:
    """flux | chroma | sdxl | sd15 | qwen-image | wan | unknown, from the modules a LoRA targets (and shapes
    where needed)."""
    names = [n[len(km.DIFFUSION):] for n in lora.modules if n.startswith(km.DIFFUSION)]
    encoders = {te[0] for n in lora.modules if (te := km.split_te(n))}
    recorded = lora.metadata.get("weightsmith.arch")
    if any(km.is_wan_module(n) for n in names):
        return "wan"
    if any(s3.is_sd3_only(n) for n in names) or (
            recorded == "sd3" and names and all(s3.is_sd3_module(n) for n in names)):
        return "sd3"
    if any(hd.is_hidream_only(n) for n in names) or (
            recorded == "hidream" and names and all(hd.is_hidream_module(n) for n in names)):
        return "hidream"
    if any(lu.is_lumina_only(n) for n in names) or (
            recorded == "lumina2" and names and all(lu.is_lumina_module(n) for n in names)):
        return "lumina2"
    if any(n.startswith("transformer_blocks.") or km.is_qwen_only(n) for n in names) or (
            recorded == "qwen-image" and names and all(km.is_qwen_module(n) for n in names)):
        return "qwen-image"  # canonical Flux names never start with transformer_blocks (those are BFL's double_blocks)
    if names and set(names) <= _SHARED_INPUTS:
        return _input_projection_arch(lora, recorded)
    if any(km.is_flux_module(n) or f2.is_flux2_module(n) for n in names):
        if any(km.is_chroma_only(n) for n in names):
            return "chroma"
        generation = flux_generation(lora)
        if generation == "flux2" or any(km.is_flux_modulation(n) and not f2.is_flux2_module(n) for n in names):
            return generation
        if recorded == "chroma" or (recorded == "flux2" and generation is None):
            return recorded  # Chroma has Flux's widths; an attention-only LoRA fits both generations
        return "flux"
    if any(km.SD_LDM_RE.match(n) for n in names):
        if recorded in ("sd15", "sdxl"):
            return recorded
        if "clip_g" in encoders or any(n.startswith("label_emb.") for n in names):
            return "sdxl"
        if any(n.startswith("input_blocks.1.1.") for n in names):
            return "sd15"
        for n in names:
            if n.endswith("attn2.to_k"):
                mod = lora.modules[km.DIFFUSION + n]
                width = mod.terms[0].down.shape[1] if mod.terms else (mod.diff.shape[1] if mod.diff is not None else 0)
                if width in (768, 2048):
                    return "sd15" if width == 768 else "sdxl"
        return "sd15"
    if encoders:
        if "clip_g" in encoders:
            return "sdxl"
        if "t5xxl" in encoders:
            return "flux" if "clip_l" in encoders else "chroma"
        return "sd15"
    return "unknown"


# Layers Flux, Flux.2 and Qwen-Image all name alike: a LoRA on these alone is told apart by widths or the metadata
_SHARED_INPUTS = {"img_in", "txt_in"}
# txt_in's input width is the text encoder's: T5-XXL (Flux, Chroma), Qwen2.5-VL (Qwen-Image), Mistral 3 × 3 layers
# (Flux.2 dev); img_in's is the latent patch: 64 for Flux and Qwen-Image, 128 for Flux.2
_TXT_IN_WIDTHS = {4096: "flux", 3584: "qwen-image", 15360: "flux2"}


def _input_widths_arch(lora: LoRA) -> str | None:
    """The architecture the widths of a LoRA's img_in/txt_in name, or None."""
    for name, mod in lora.modules.items():
        shape = _module_shape(mod)
        if shape is None:
            continue
        if name.endswith("txt_in") and shape[1] in _TXT_IN_WIDTHS:
            return _TXT_IN_WIDTHS[shape[1]]
        if name.endswith("img_in") and shape[1] == 128:
            return "flux2"
    return None


def _input_projection_arch(lora: LoRA, recorded: str | None) -> str:
    """The architecture of a LoRA on img_in/txt_in only: the recorded one, else the one the widths name, else Flux
    (an img_in of width 64 fits Flux and Qwen-Image alike: a caller's architecture is then taken, see _checked_arch)."""
    if recorded in ("flux", "chroma", "flux2", "qwen-image"):
        return recorded
    return _input_widths_arch(lora) or "flux"


def _inputs_only_and_undecided(lora: LoRA) -> bool:
    names = {n[len(km.DIFFUSION):] for n in lora.modules if n.startswith(km.DIFFUSION)}
    return bool(names) and names <= _SHARED_INPUTS and _input_widths_arch(lora) is None


def _module_shape(mod) -> tuple[int, int] | None:
    """(rows, input width) of the weight a module changes, where a whole-weight part tells it."""
    for t in mod.terms:
        if t.rows is None:
            return int(t.up.shape[0]), int(t.down.flatten(1).shape[1])
    if mod.diff is not None and mod.diff.ndim == 2:
        return int(mod.diff.shape[0]), int(mod.diff.shape[1])
    return None


def flux_generation(lora: LoRA) -> str | None:
    """'flux2' or 'flux' when a BFL-named LoRA's modules tell them apart, else None (an attention-only LoRA has the
    same names and shapes on both): Flux's per-block modulations and vector embedder, Flux.2's shared modulations,
    or the MLP widths (Flux: linear1 7·H, mlp.0 4·H; Flux.2's SwiGLU: 9·H and 6·H)."""
    names = {n[len(km.DIFFUSION):]: m for n, m in lora.modules.items() if n.startswith(km.DIFFUSION)}
    if any(f2.is_flux2_only(n) for n in names):
        return "flux2"
    if any(km.is_flux_modulation(n) and not f2.is_flux2_module(n) for n in names):
        return "flux"
    for n, mod in names.items():
        leaf = "linear1" if n.endswith(".linear1") else "mlp.0" if n.endswith(("img_mlp.0", "txt_mlp.0")) else None
        shape = _module_shape(mod) if leaf else None
        if shape is not None and shape[1]:
            ratio = shape[0] / shape[1]
            if ratio == f2.FLUX2_ROW_RATIOS[leaf]:
                return "flux2"
            if ratio == {"linear1": 7, "mlp.0": 4}[leaf]:
                return "flux"
    return None


def _checked_arch(lora: LoRA, hint: str | None, where: str) -> str:
    found = infer_arch(lora)
    if hint is None:
        return found
    if {found, hint} == {"flux", "flux2"} and flux_generation(lora) is None:
        return hint  # names and shapes both fit: an attention-only LoRA on either generation
    if hint in ("flux", "chroma", "flux2", "qwen-image") and _inputs_only_and_undecided(lora):
        return hint  # img_in alone (width 64) fits Flux and Qwen-Image alike
    if found != "unknown" and arch_family(found) != arch_family(hint):
        raise MismatchError(f"{where}: this is {an_arch(found)} LoRA, not {an_arch(hint)} one; use it with {an_arch(found)} model")
    names = [n[len(km.DIFFUSION):] for n in lora.modules if n.startswith(km.DIFFUSION)]
    if hint == "chroma" and (mod := [n for n in names if km.is_flux_modulation(n)]):
        raise MismatchError(f"{where}: this Flux LoRA targets layers Chroma does not have ({', '.join(mod[:4])}…); "
                            "convert it with flux_to_chroma / `weightsmith convert --target-arch chroma`")
    if hint == "flux" and (only := [n for n in names if km.is_chroma_only(n)]):
        raise MismatchError(f"{where}: this is a Chroma LoRA (it targets {only[0]}), not a Flux one")
    return hint  # within a family the caller knows best (SD1.5 vs SDXL from names alone can be ambiguous)


def _writable(fmt: str) -> Format:
    f = FORMATS.get(fmt)
    if f is None or f.write is None or f.namer is None:
        raise MismatchError(f"cannot write LoRA format {fmt!r}; writable formats: {', '.join(WRITABLE_FORMATS)}")
    return f


def lora_state_dict(lora: LoRA, fmt: str = "comfy", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LoRA as a state dict in `fmt` (comfy | kohya | diffusers | onetrainer); ΔW exactly preserved.
    `dtype` casts factors and diffs (alphas stay fp32 scalars); None keeps each tensor's dtype. A module
    the format cannot hold whole raises UnwritableError naming every such module; nothing is dropped."""
    return _writable(fmt).write(lora, dtype)


def unwritable_modules(lora: LoRA, fmt: str) -> dict[str, str]:
    """{module: why} for the modules `fmt` cannot hold whole, from the names alone (no tensor is touched)."""
    _writable(fmt)
    return unwritable_in(lora, fmt)


def check_writable(lora: LoRA, fmt: str) -> None:
    """Raise UnwritableError (the message every writer gives) when `fmt` cannot hold some module of `lora`."""
    if problems := unwritable_modules(lora, fmt):
        raise unwritable_error(lora, fmt, problems)


def _parts(mod) -> tuple[str, ...]:
    return tuple(role for role, v in (("factors", mod.terms), ("adapters", mod.adapters), ("diff", mod.diff),
                                      ("bias change", mod.diff_b), ("replacement", mod.set_weight))
                 if v is not None and not (isinstance(v, list) and not v))


def read_back(lora: LoRA, fmt: str, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> LoRA:
    """`sd` (what the `fmt` writer made of `lora`) read by the `fmt` reader, as a file with `metadata` would
    be; MismatchError naming every module (or part of one) that would not come back, so nothing is lost
    between a writer and its reader."""
    hint = lora.arch if lora.arch in LORA_ARCHES else None
    src = DictSource(sd, name=f"<{fmt} state dict>", metadata=dict(metadata)).set_nonfinite_policy("ignore")
    back = FORMATS[fmt].read(src, hint)  # names only: the values are the writer's, not scanned again
    lost = []
    for name in sorted(lora.modules):
        want = _parts(lora.modules[name])
        got = _parts(back.modules[name]) if name in back.modules else ()
        if want and got != want:
            lost.append(f"{name} ({', '.join(p for p in want if p not in got) or 'read as ' + '+'.join(got)})")
    extra = sorted(set(back.modules) - set(lora.modules)) + list(back.unknown_keys)
    if lost or extra:
        shown = ", ".join((lost + extra)[:8]) + (f", … ({len(lost) + len(extra)} in all)" if len(lost) + len(extra) > 8 else "")
        raise MismatchError(f"the {fmt} names of this {lora.arch} LoRA do not read back as the same modules: {shown}; "
                            "nothing was written: use the comfy format, which names every module as ComfyUI does")
    back.arch, back.source_format = lora.arch, fmt
    return back


def reformat_lora(lora: LoRA, fmt: str) -> LoRA:
    """The LoRA as its `fmt` file reads back (factors as that format stores them: split q/k/v, baked alphas),
    with the same modules, metadata and list of keys not understood; refused (UnwritableError / MismatchError,
    naming the modules) when `fmt` cannot hold every module."""
    meta = {**lora.metadata, "weightsmith.format": fmt, "weightsmith.arch": lora.arch}
    back = read_back(lora, fmt, lora_state_dict(lora, fmt), meta)
    back.metadata = {**lora.metadata, **back.metadata}
    back.unknown_keys = list(lora.unknown_keys)
    return back


def save_lora(
    lora: LoRA,
    path: str | os.PathLike,
    fmt: str = "comfy",
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    protect: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
) -> Path:
    """Write the LoRA atomically as .safetensors in `fmt`; the metadata records architecture and format.
    Every module is written and reads back from the file's names (checked before anything is written), or
    nothing is written and the error names the modules."""
    sd = lora_state_dict(lora, fmt, dtype)
    if not sd:
        raise MismatchError(f"{path}: the LoRA has no modules left to save (every module is empty or was dropped); "
                            "nothing was written: check the strengths and what a conversion dropped")
    from .peft_metadata import KEY as PEFT_KEY
    from .peft_metadata import fresh_metadata

    # An input's PEFT config describes its own ranks and scales: never carried over; a diffusers output gets
    # one describing the file written (its scales are baked into lora_B).
    meta = {k: v for k, v in lora.metadata.items() if isinstance(k, str) and isinstance(v, str) and k != PEFT_KEY}
    if fmt == "diffusers" and (peft := fresh_metadata(sd)):
        meta[PEFT_KEY] = peft
    meta.update({"weightsmith.format": fmt, "weightsmith.arch": lora.arch, "weightsmith.source_format": lora.source_format})
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    meta = _stamp_lora(lora, meta, path)
    read_back(lora, fmt, sd, meta)
    return write_safetensors(path, sd, meta, protect=protect, overwrite=overwrite)


def _stamp_lora(lora: LoRA, meta: dict[str, str], path) -> dict[str, str]:
    """The LoRA's metadata with the provenance keys (provenance.py): what the LoRA's inputs said about
    themselves is dropped, modelspec/ss_*/recipe are written fresh. A LoRA extracted from a Flux dev model
    is `flux-1-dev/lora`; one for dev and schnell alike `flux-1/lora`."""
    import json

    from ..provenance import stamp

    arch = lora.arch
    base = lora.metadata.get(BASE_ARCH_META, "")
    if base and base != arch and arch == "flux" and base in ("flux-dev", "flux-schnell"):
        arch = base
    names = []
    try:  # a composed LoRA: its inputs, as compose recorded them
        names = [i["name"] for i in json.loads(lora.metadata.get("weightsmith.compose", "{}")).get("inputs", [])]
    except (ValueError, TypeError, KeyError, AttributeError):
        names = []
    return stamp(meta, output=path, operation="save_lora", arch=arch, lora=lora, merged=names or False,
                 summary={"arch": lora.arch, "format": meta.get("weightsmith.format")})


def lora_summary(lora: LoRA) -> dict:
    """`LoRA.summary()` plus the factor dtypes and the names of keys not understood (for reports)."""
    s = lora.summary()
    s["dtypes"] = sorted({str(t.up.dtype).replace("torch.", "") for m in lora.modules.values() for t in m.terms}
                         | {str(a.dtype()).replace("torch.", "") for m in lora.modules.values() for a in m.adapters})
    types: dict[str, int] = {}
    for m in lora.modules.values():
        for k in m.types():
            types[k] = types.get(k, 0) + 1
    s["types"] = ", ".join(f"{k} {n}" for k, n in types.items())
    s["unknown_key_names"] = list(lora.unknown_keys)
    return s
