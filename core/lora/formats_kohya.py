"""ComfyUI-native, kohya and OneTrainer LoRA formats (lora_up / lora_down / alpha).

- comfy: `diffusion_model.<BFL/LDM module>.lora_up.weight`, `.lora_down.weight`, `.alpha`, `.diff`, `.diff_b`,
  `.set_weight`; `text_encoders.<encoder>.transformer.<HF module>.*`. Names every module of every model.
- kohya: `lora_unet_<BFL name underscored>` for Flux/Chroma; `lora_unet_<diffusers name underscored>` for SD
  UNets (LDM-underscored names are read too); `lora_te{,1,2}_<HF name underscored>`; alpha always written.
- onetrainer: `lora_transformer_<diffusers Flux name underscored>` (split q/k/v), kohya names otherwise.
- lycoris (SimpleTuner's LyCORIS files): `lycoris_<diffusers name underscored>` for Flux (split q/k/v) and SD
  UNets, kohya names for text encoders.
Every naming here carries every adapter type (LoKr, LoHa, DoRA, Tucker cores): ComfyUI reads the same
suffixes under each prefix.
"""

from __future__ import annotations

import re

import torch

from ..sources import TensorSource
from . import keymaps as km
from . import keymaps_flux2 as f2
from . import keymaps_hidream as hd
from . import keymaps_lumina2 as lu
from . import keymaps_sd3 as s3
from .formats_base import (
    KOHYA_SUFFIXES,
    NO_NAME_WHY,
    Format,
    OutName,
    Target,
    WriteStyle,
    assemble,
    group_keys,
    new_lora,
    register,
    sd_layout_of,
    whole_shape,
    write_with,
)
from .model import LoRA

KOHYA_STYLE = WriteStyle(up=".lora_up.weight", down=".lora_down.weight", alpha="always")
COMFY_STYLE = WriteStyle(up=".lora_up.weight", down=".lora_down.weight", alpha="keep")

_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "final_layer.", "time_in.", "vector_in.",
              "guidance_in.", "distilled_guidance_layer.", "nerf_")


# --- comfy -----------------------------------------------------------------------------------------


def _comfy_target(prefix: str) -> Target | None:
    if prefix.startswith(km.TEXT):
        return Target(prefix)
    for p in ("model.diffusion_model.", km.DIFFUSION, "transformer."):
        if prefix.startswith(p):
            name = prefix[len(p):]
            break
    else:
        name = prefix
        if not (name.startswith(_BFL_ROOTS) or km.SD_LDM_RE.match(name)):
            return None
    if prefix.startswith("transformer.") and not name.startswith(_BFL_ROOTS):
        return None  # diffusers names: the diffusers reader's business
    if lu.is_diffusers_name(name):  # ComfyUI maps Z-Image's diffusers names under `diffusion_model.` (ai-toolkit)
        piece = lu.lumina_from_diffusers(name)
        return Target(km.DIFFUSION + piece.bfl, piece.rows) if piece else None
    m = re.match(r"^single_blocks\.(\d+)\.linear1_qkv$", name)
    if m:  # XLabs/USO spelling ComfyUI registers: the q|k|v rows of linear1
        return Target(f"{km.DIFFUSION}single_blocks.{m.group(1)}.linear1", rows=(0, 3))
    return Target(km.DIFFUSION + name)


def detect_comfy(keys: list[str]) -> int:
    n = 0
    for k in keys:
        if k.startswith((km.DIFFUSION, km.TEXT, "model.diffusion_model.", "transformer.double_blocks.",
                         "transformer.single_blocks.")):
            n += 1
        elif k.startswith(_BFL_ROOTS) and k.endswith((".lora_up.weight", ".lora_down.weight", ".diff", ".diff_b")):
            n += 1
    return n


def read_comfy(src: TensorSource, arch: str | None) -> LoRA:
    lora = new_lora(src, "comfy")
    groups, rest = group_keys(src.keys(), KOHYA_SUFFIXES + [(".lora_B.weight", "up"), (".lora_A.weight", "down")])
    lora.unknown_keys.extend(rest)
    assemble(src, groups, _comfy_target, lora)
    return lora


def _comfy_namer(lora: LoRA):
    return lambda name, arch: [OutName(name)]


def write_comfy(lora: LoRA, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return write_with(lora, dtype, _comfy_namer(lora), COMFY_STYLE, "comfy")


# --- kohya / OneTrainer ----------------------------------------------------------------------------

_TE_RE = re.compile(r"^lora_te(\d?)_(.+)$")


def _kohya_resolver(arch: str | None, layout: str, qwen: bool = False, sd3_src: TensorSource | None = None):
    def sd3_target(prefix: str, name: str) -> Target | None:
        from .formats_peft import pre_only

        piece = s3.sd3_from_diffusers(name, pre_only=pre_only(sd3_src, prefix))
        return Target(km.DIFFUSION + piece.bfl, piece.rows, piece.swap) if piece else None

    def resolve(prefix: str) -> Target | None:
        if sd3_src is not None and prefix.startswith(("lycoris_", "lora_transformer_")):
            return sd3_target(prefix, km.dotted(prefix.removeprefix("lycoris_").removeprefix("lora_transformer_")))
        if prefix.startswith("lora_unet_"):
            # `lora_unet__blocks_…`: VideoX-Fun's Wan LoRAs (ComfyUI's convert_lora_wan_fun drops the extra `_`)
            name = km.dotted(prefix[len("lora_unet_"):].removeprefix("_"))
            if (km.is_flux_module(name) or f2.is_flux2_module(name) or km.SD_LDM_RE.match(name) or km.is_qwen_module(name)
                    or km.is_wan_module(name) or lu.is_lumina_module(name) or hd.is_hidream_module(name)
                    or s3.is_sd3_module(name)):
                return Target(km.DIFFUSION + name)
            if lu.is_diffusers_name(name):  # musubi-tuner names Z-Image's diffusers modules
                piece = lu.lumina_from_diffusers(name)
                return Target(km.DIFFUSION + piece.bfl, piece.rows) if piece else None
            if km.SD_DIFFUSERS_RE.match(name):
                ldm = km.sd_from_diffusers(name, layout)
                return Target(km.DIFFUSION + ldm) if ldm else None
            return None
        if prefix.startswith("lycoris_"):
            name = km.dotted(prefix[len("lycoris_"):])
            if qwen:  # SimpleTuner names Qwen-Image's native (= diffusers) modules; ComfyUI maps them as such
                return Target(km.DIFFUSION + name) if km.is_qwen_module(name) else None
            if hd.is_hidream_module(name):  # SimpleTuner names HiDream's own (= diffusers) modules
                return Target(km.DIFFUSION + name)
            piece = km.flux_from_diffusers(name) or f2.flux2_from_diffusers(name) or lu.lumina_from_diffusers(name)
            if piece is not None:
                return Target(km.DIFFUSION + piece.bfl, piece.rows, piece.swap)
            if km.SD_DIFFUSERS_RE.match(name):
                ldm = km.sd_from_diffusers(name, layout)
                return Target(km.DIFFUSION + ldm) if ldm else None
            return None
        if prefix.startswith("lora_transformer_"):
            name = km.dotted(prefix[len("lora_transformer_"):])
            piece = km.flux_from_diffusers(name) or f2.flux2_from_diffusers(name)
            return Target(km.DIFFUSION + piece.bfl, piece.rows, piece.swap) if piece else None
        m = _TE_RE.match(prefix)
        if m:
            hf = km.dotted(m.group(2))
            return Target(km.te_name(km.kohya_te_encoder(m.group(1), hf, arch or ""), hf))
        return None

    return resolve


def detect_kohya(keys: list[str]) -> int:
    return sum(k.startswith(("lora_unet_", "lora_te")) for k in keys)


def detect_lycoris(keys: list[str]) -> int:
    n = sum(k.startswith("lycoris_") for k in keys)
    return n + sum(k.startswith("lora_te") for k in keys) if n else 0


def detect_onetrainer(keys: list[str]) -> int:
    n = sum(k.startswith("lora_transformer_") for k in keys)
    return n + sum(k.startswith("lora_te") for k in keys) if n else 0


def detect_onetrainer_recorded(keys: list[str]) -> int:
    """A file whose metadata says OneTrainer wrote it: its SD UNet keys carry kohya's `lora_unet_` names."""
    return sum(k.startswith(("lora_transformer_", "lora_unet_", "lora_te")) for k in keys)


def _read_kohya_family(src: TensorSource, arch: str | None, fmt: str) -> LoRA:
    lora = new_lora(src, fmt)
    keys = src.keys()
    layout = sd_layout_of(src, arch) if any(k.startswith(("lora_unet_", "lycoris_")) for k in keys) else ""
    groups, rest = group_keys(keys, KOHYA_SUFFIXES)
    lora.unknown_keys.extend(rest)
    lyco = [km.dotted(p[len("lycoris_"):]) for p in groups if p.startswith("lycoris_")]
    qwen = arch == "qwen-image" or (arch not in ("flux", "chroma") and bool(lyco) and (
        src.metadata.get("weightsmith.arch") == "qwen-image" or km.looks_qwen(lyco)))
    from .formats_peft import attention_width

    diffusers_named = [km.dotted(p.removeprefix("lycoris_").removeprefix("lora_transformer_")) for p in groups
                       if p.startswith(("lycoris_", "lora_transformer_"))]
    recorded = src.metadata.get("weightsmith.arch")
    sd3 = arch == "sd3" or (arch is None and bool(diffusers_named) and recorded in (None, "unknown", "sd3") and (
        recorded == "sd3" or s3.looks_sd3(diffusers_named, attention_width(src))))
    assemble(src, groups, _kohya_resolver(arch, layout, qwen, src if sd3 else None), lora)
    return lora


def read_kohya(src: TensorSource, arch: str | None) -> LoRA:
    return _read_kohya_family(src, arch, "kohya")


def read_onetrainer(src: TensorSource, arch: str | None) -> LoRA:
    return _read_kohya_family(src, arch, "onetrainer")


def read_lycoris(src: TensorSource, arch: str | None) -> LoRA:
    return _read_kohya_family(src, arch, "lycoris")


def _te_kohya_name(module: str, arch: str) -> list[OutName]:
    enc, hf = km.split_te(module) or (None, "")
    idx = km.kohya_te_index(enc, arch) if enc else None
    return [] if idx is None else [OutName(f"lora_te{idx}_{km.underscored(hf)}")]


def sd_unet_kohya_name(module: str, lora: LoRA) -> str:
    """kohya name of an SD UNet module: diffusers-underscored where the layout has a diffusers name,
    LDM-underscored otherwise (ComfyUI registers both for every weight)."""
    ldm = module[len(km.DIFFUSION):]
    d = km.sd_to_diffusers(ldm, km.sd_layout(lora.arch, lora.metadata))
    return "lora_unet_" + km.underscored(d or ldm)


def _kohya_namer(lora: LoRA):
    def names(module: str, arch: str) -> list[OutName]:
        if module.startswith(km.TEXT):
            return _te_kohya_name(module, arch)
        if km.is_parameter_name(module):
            return []  # ComfyUI's kohya map covers `.weight` parameters only
        if arch in ("sd15", "sdxl"):
            return [OutName(sd_unet_kohya_name(module, lora))]
        return [OutName("lora_unet_" + km.underscored(module[len(km.DIFFUSION):]))]

    return names


def write_kohya(lora: LoRA, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return write_with(lora, dtype, _kohya_namer(lora), KOHYA_STYLE, "kohya")


def _onetrainer_namer(lora: LoRA, prefix: str = "lora_transformer_"):
    kohya = _kohya_namer(lora)

    def names(module: str, arch: str) -> list[OutName]:
        if module.startswith(km.TEXT):
            return kohya(module, arch)
        if arch == "qwen-image":  # ComfyUI maps `lycoris_<native name>` for Qwen-Image, no `lora_transformer_`
            name = module[len(km.DIFFUSION):]
            return [OutName(prefix + km.underscored(name))] if prefix == "lycoris_" and km.is_qwen_module(name) else []
        if arch == "sd3":  # ComfyUI maps both prefixes on mmdit_to_diffusers' names
            from .formats_peft import sd3_diffusers_names

            return [OutName(prefix + km.underscored(d), p.rows, p.swap, split=p.rows is not None or p.swap)
                    for d, p in sd3_diffusers_names(module[len(km.DIFFUSION):], lora)]
        if arch == "hidream":  # ComfyUI maps `lycoris_<name>` (its names are diffusers'), no `lora_transformer_`
            name = module[len(km.DIFFUSION):]
            ok = prefix == "lycoris_" and hd.is_hidream_module(name) and not km.is_parameter_name(name)
            return [OutName(prefix + km.underscored(name))] if ok else []
        if arch == "lumina2":  # ComfyUI maps `lycoris_<diffusers name>` for `.weight`s, no `lora_transformer_`
            name = module[len(km.DIFFUSION):]
            return [OutName(prefix + km.underscored(d), p.rows, p.swap, split=p.rows is not None)
                    for d, p in lumina_diffusers_names(name, lora)] if prefix == "lycoris_" and not km.is_parameter_name(
                name) else []
        if arch == "flux2":  # diffusers' Flux.2 names where ComfyUI 0.3.75 loads them under this prefix too
            return [OutName(prefix + km.underscored(d), p.rows, p.swap, split=p.rows is not None or p.swap)
                    for d, p in f2.flux2_diffusers_names(module[len(km.DIFFUSION):])]
        if arch not in ("flux", "chroma", "sd15", "sdxl"):
            return []  # Wan and unknown models: ComfyUI 0.3.75 maps neither naming for them
        if arch in ("sd15", "sdxl"):
            if prefix == "lora_transformer_":
                return kohya(module, arch)
            d = km.sd_to_diffusers(module[len(km.DIFFUSION):], km.sd_layout(arch, lora.metadata))
            return [OutName(prefix + km.underscored(d))] if d else []
        if km.is_chroma_only(module[len(km.DIFFUSION):]):
            return []  # no ComfyUI-loadable diffusers name for Chroma's guidance layer
        return [
            OutName(prefix + km.underscored(d), p.rows, p.swap, split=p.rows is not None or p.swap)
            for d, p in km.flux_to_diffusers(module[len(km.DIFFUSION):])
        ]

    return names


def lumina_diffusers_names(name: str, lora: LoRA):
    """Z-Image / Lumina 2 diffusers names of a module (no prefix); none for a grouped-query qkv (Lumina 2), which
    ComfyUI 0.3.75 would cut into equal thirds."""
    names = lu.lumina_to_diffusers(name)
    if any(p.rows is not None for _, p in names):
        shape = whole_shape(km.DIFFUSION + name, lora.modules[km.DIFFUSION + name])
        if shape is None or shape[0] != 3 * shape[1]:
            return []
    return names


def _lumina_no_name(module: str, fmt: str) -> str | None:
    name = module[len(km.DIFFUSION):]
    if fmt == "onetrainer":
        return "ComfyUI 0.3.75 maps no lora_transformer_ names for Lumina 2 / Z-Image"
    if fmt == "lycoris" and km.is_parameter_name(name):
        return "ComfyUI 0.3.75 maps lycoris_ names for `.weight`s only"
    if name.endswith("attention.qkv"):
        return ("a grouped-query qkv (Lumina 2): ComfyUI 0.3.75 cuts the split to_q/to_k/to_v names into equal "
                "thirds, which fits Z-Image only")
    return f"ComfyUI 0.3.75 maps no {fmt} name for it" if not lu.lumina_to_diffusers(name) else None


NO_NAME_WHY["lumina2"] = _lumina_no_name


def write_onetrainer(lora: LoRA, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return write_with(lora, dtype, _onetrainer_namer(lora), KOHYA_STYLE, "onetrainer")


def write_lycoris(lora: LoRA, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return write_with(lora, dtype, _onetrainer_namer(lora, "lycoris_"), COMFY_STYLE, "lycoris")


register(Format("comfy", "ComfyUI-native: diffusion_model.<module>.lora_up/lora_down/alpha, diff, diff_b, set_weight",
                detect_comfy, read_comfy, write_comfy, namer=_comfy_namer))
register(Format("kohya", "kohya sd-scripts: lora_unet_* / lora_te*_*, lora_up/lora_down + alpha",
                detect_kohya, read_kohya, write_kohya, namer=_kohya_namer))
register(Format("onetrainer", "OneTrainer: lora_transformer_<diffusers name> (split q/k/v), lora_te*_*, alpha; "
                "SD UNets under kohya's lora_unet_* names", detect_onetrainer, read_onetrainer, write_onetrainer,
                namer=_onetrainer_namer, detect_recorded=detect_onetrainer_recorded))
register(Format("lycoris", "SimpleTuner LyCORIS: lycoris_<diffusers name underscored> (split q/k/v), lora_te*_*; "
                "LoKr/LoHa/LoRA/DoRA keys", detect_lycoris, read_lycoris, write_lycoris,
                namer=lambda lora: _onetrainer_namer(lora, "lycoris_")))
