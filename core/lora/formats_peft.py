"""diffusers / PEFT-style LoRA formats (lora_A / lora_B) and the Flux-specific XLabs and BFL layouts.

- diffusers (also ai-toolkit, SimpleTuner, DiffSynth without prefix): Flux `transformer.<diffusers name>`
  with q/k/v and proj_mlp split out of the fused BFL weights and `norm_out.linear` halves swapped; SD UNets
  `unet.<diffusers name>` (written in the attention-processor spelling `attn1.processor.to_q_lora.up.weight`
  / `resnets.0.conv1.lora.up.weight`, the one both ComfyUI and diffusers load); text encoders
  `text_encoder{,_2}.<HF name>`. Scales are baked into lora_B (files carry no alpha).
- xlabs (read only): `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`, single blocks
  `qkv_lora` (linear1's q|k|v rows) and `proj_lora` (linear2). ComfyUI 0.3.75 loads only the full USO set.
- bfl_control (read only): bare BFL names with lora_A/lora_B, `lora_B.bias` (a bias change) and norm
  `scale` tensors (replacements).
- peft_bfl (read only): `base_model.model.<BFL name>.lora_A/lora_B` (FAL and other PEFT trainers).
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
    NO_NAME_WHY,
    PEFT_SUFFIXES,
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
from .peft_metadata import KEY as PEFT_KEY
from .peft_metadata import alpha_resolver

DIFFUSERS_STYLE = WriteStyle(up=".lora_B.weight", down=".lora_A.weight", alpha="bake", adapters=False)
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "final_layer.", "time_in.", "vector_in.",
              "guidance_in.", "distilled_guidance_layer.")
_FLUX_DIFFUSERS_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                         "time_text_embed.", "norm_out.", "proj_out.") + f2.FLUX2_DIFFUSERS_ROOTS


# --- diffusers -------------------------------------------------------------------------------------


def _flux_piece(name: str) -> Target | None:
    # Flux's and Flux.2's diffusers tables agree on every name they share, so one lookup after the other is exact
    piece = km.flux_from_diffusers(name) or f2.flux2_from_diffusers(name)
    if piece is not None:
        return Target(km.DIFFUSION + piece.bfl, piece.rows, piece.swap)
    if km.is_flux_module(name) or f2.is_flux2_module(name):  # BFL names under `transformer.` (seen in the wild)
        return Target(km.DIFFUSION + name)
    return None


def _sd_piece(name: str, layout: str) -> Target | None:
    name = name.replace(".processor.", ".")
    if name.endswith(".to_out"):
        name += ".0"
    ldm = km.sd_from_diffusers(name, layout)
    return Target(km.DIFFUSION + ldm) if ldm else None


def _diffusers_resolver(src: TensorSource, arch: str | None):
    layout = ""
    # Qwen-Image's diffusers names are its native ones and overlap Flux's diffusers names (`transformer_blocks.N.
    # attn.to_q`): which one a file means is decided once, from the hint, the recorded arch or the names.
    names = [k[len("transformer."):] if k.startswith("transformer.") else k for k in src.keys()]
    qwen = arch == "qwen-image" or (arch not in ("flux", "chroma") and (
        src.metadata.get("weightsmith.arch") == "qwen-image" or km.looks_qwen(names)))
    recorded = src.metadata.get("weightsmith.arch")
    sd3 = arch == "sd3" or (arch is None and recorded in (None, "unknown", "sd3") and (recorded == "sd3" or s3.looks_sd3(
        [_unprefixed(k) for k in src.keys()], attention_width(src))))
    hidream = arch == "hidream" or any(hd.is_hidream_only(_unprefixed(k)) for k in src.keys())
    lumina = arch == "lumina2" or any(lu.is_diffusers_name(_unprefixed(k)) for k in src.keys())

    def sd(name: str) -> Target | None:
        nonlocal layout
        layout = layout or sd_layout_of(src, arch)
        return _sd_piece(name, layout)

    def resolve(prefix: str) -> Target | None:
        for p in ("diffusion_model.", "transformer."):  # Z-Image: ai-toolkit's `diffusion_model.`, PEFT's `transformer.`
            name = prefix[len(p):]
            if prefix.startswith(p) and (lu.is_diffusers_name(name) or (lumina and lu.is_lumina_module(name))):
                piece = lu.lumina_from_diffusers(name)
                return Target(km.DIFFUSION + piece.bfl, piece.rows) if piece else Target(km.DIFFUSION + name)
        if sd3:
            name = prefix.removeprefix("transformer.").removeprefix("base_model.model.")
            piece = s3.sd3_from_diffusers(name, pre_only=pre_only(src, prefix))
            return Target(km.DIFFUSION + piece.bfl, piece.rows, piece.swap) if piece else None
        if hidream and prefix.startswith("transformer."):  # SimpleTuner: HiDream's own (= diffusers) names
            name = prefix[len("transformer."):]
            return Target(km.DIFFUSION + name) if hd.is_hidream_module(name) else None
        if qwen:
            name = prefix[len("transformer."):] if prefix.startswith("transformer.") else prefix
            return Target(km.DIFFUSION + name) if km.is_qwen_module(name) else None
        if prefix.startswith("transformer."):
            return _flux_piece(prefix[len("transformer."):])
        if prefix.startswith("unet."):
            return sd(prefix[len("unet."):])
        m = re.match(r"^(text_encoder(?:_2)?)\.(.+)$", prefix)
        if m:
            return Target(km.te_name(km.diffusers_te_encoder(m.group(1), m.group(2), arch or ""), m.group(2)))
        if prefix.startswith(_FLUX_DIFFUSERS_ROOTS):
            return _flux_piece(prefix)
        if km.SD_DIFFUSERS_RE.match(prefix):
            return sd(prefix)
        return None

    return resolve


_UP_SUFFIXES = (".lora_B.weight", ".lora_up.weight", ".lora.up.weight")
_DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight", ".lora.down.weight")


def attention_width(src: TensorSource) -> int | None:
    """Input width of a double block's attention (`transformer_blocks.N.attn.to_q`) LoRA factor, if the file has one."""
    for k in src.keys():
        if re.search(r"transformer_blocks[._]\d+[._]attn[._]to_q", k) and k.endswith(_DOWN_SUFFIXES):
            shape = src.info(k).shape
            return int(shape[1]) if len(shape) > 1 else None
    return None


def pre_only(src: TensorSource, prefix: str) -> bool:
    """Whether the module `prefix` names is a 2·H-row modulation (SD3's last, pre-only context block)."""
    if not prefix.endswith(("norm1_context.linear", "norm1_context_linear")):
        return False
    up = next((prefix + s for s in _UP_SUFFIXES if prefix + s in src), None)
    down = next((prefix + s for s in _DOWN_SUFFIXES if prefix + s in src), None)
    if up is None or down is None:
        diff = prefix + ".diff"
        return diff in src and len(src.info(diff).shape) == 2 and src.info(diff).shape[0] == 2 * src.info(diff).shape[1]
    return src.info(up).shape[0] == s3.PRE_ONLY_ROWS * src.info(down).shape[1]


def sd3_diffusers_names(name: str, lora: LoRA) -> list[tuple[str, km.Piece]]:
    """diffusers names of an SD3 module; the last context block's 2·H-row modulation gets its halves swapped."""
    shape = whole_shape(km.DIFFUSION + name, lora.modules[km.DIFFUSION + name]) if name in (
        n[len(km.DIFFUSION):] for n in lora.modules) else None
    return s3.sd3_to_diffusers(name, pre_only=shape is not None and shape[0] == s3.PRE_ONLY_ROWS * shape[1])


def _unprefixed(key: str) -> str:
    """A LoRA key's module name without its `diffusion_model.` / `transformer.` prefix and LoRA suffix."""
    for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha", ".diff", ".diff_b", ".lora_up.weight",
                   ".lora_down.weight"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
            break
    return key.removeprefix("diffusion_model.").removeprefix("transformer.").removeprefix("base_model.model.")


def detect_diffusers(keys: list[str]) -> int:
    n = 0
    if any(k.startswith("diffusion_model.") and k.endswith(".lora_A.weight") and lu.is_diffusers_name(_unprefixed(k))
           for k in keys):  # ai-toolkit's Z-Image layout: diffusers names under ComfyUI's prefix
        n += sum(k.startswith("diffusion_model.") for k in keys)
    for k in keys:
        if k.startswith("transformer."):
            n += not k.startswith(("transformer.double_blocks.", "transformer.single_blocks."))
        elif k.startswith("base_model.model.") and not k[len("base_model.model."):].startswith(_BFL_ROOTS):
            n += 1  # PEFT on diffusers names (SD3's flash / diffusers training scripts)
        elif k.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
            n += 1
        elif k.startswith(_FLUX_DIFFUSERS_ROOTS) or km.SD_DIFFUSERS_RE.match(k):
            n += 1
    return n


def read_diffusers(src: TensorSource, arch: str | None) -> LoRA:
    lora = new_lora(src, "diffusers")
    groups, rest = group_keys(src.keys(), PEFT_SUFFIXES + [(".lora_up.weight", "up"), (".lora_down.weight", "down")])
    lora.unknown_keys.extend(rest)
    assemble(src, groups, _diffusers_resolver(src, arch), lora, alpha_resolver(src.metadata))
    lora.metadata.pop(PEFT_KEY, None)  # applied: the scales now live in the terms' alphas
    return lora


_SD_ATTN = re.compile(r"^(.*\.attn[12])\.(to_q|to_k|to_v|to_out\.0)$")


def _diffusers_namer(lora: LoRA):
    def names(module: str, arch: str) -> list[OutName]:
        te = km.split_te(module)
        if te is not None:
            prefix = km.diffusers_te_prefix(te[0], arch)
            return [OutName(f"{prefix}.{te[1]}")] if prefix else []
        name = module[len(km.DIFFUSION):]
        if arch in ("sd15", "sdxl"):
            d = km.sd_to_diffusers(name, km.sd_layout(arch, lora.metadata))
            if d is None:
                return []
            m = _SD_ATTN.match(d)
            if m:  # attention-processor spelling: the only one ComfyUI 0.3.75 maps for SD attention
                proj = m.group(2).replace(".0", "")
                return [OutName(f"unet.{m.group(1)}.processor.{proj}", up="_lora.up.weight", down="_lora.down.weight")]
            return [OutName(f"unet.{d}", up=".lora.up.weight", down=".lora.down.weight")]
        if arch == "qwen-image":  # diffusers' names are Qwen-Image's own; ComfyUI maps `transformer.<name>`
            return [OutName("transformer." + name)] if km.is_qwen_module(name) else []
        if arch == "sd3":  # mmdit_to_diffusers: split q/k/v, swapped final (and pre-only context) modulations
            return [OutName("transformer." + d, p.rows, p.swap, split=p.rows is not None or p.swap)
                    for d, p in sd3_diffusers_names(name, lora)]
        if arch == "hidream":  # diffusers' names are HiDream's own; ComfyUI maps `transformer.<name>` (SimpleTuner)
            return [OutName("transformer." + name)] if hd.is_hidream_module(name) and not km.is_parameter_name(
                name) else []
        if arch == "lumina2":  # ai-toolkit's layout, the one ComfyUI maps: `diffusion_model.<diffusers name>`
            from .formats_kohya import lumina_diffusers_names

            return [OutName("diffusion_model." + d, p.rows, p.swap, split=p.rows is not None)
                    for d, p in lumina_diffusers_names(name, lora)]
        if arch == "flux2":  # diffusers' own Flux.2 names, where ComfyUI 0.3.75 loads them
            return [OutName("transformer." + d, p.rows, p.swap, split=p.rows is not None or p.swap)
                    for d, p in f2.flux2_diffusers_names(name)]
        if arch not in ("flux", "chroma"):
            return []  # no diffusers naming ComfyUI 0.3.75 maps (Wan, unknown models): refused, never guessed
        if km.is_chroma_only(name):
            return []  # diffusers does name Chroma's guidance layer, but ComfyUI 0.3.75 would not load it
        return [
            OutName("transformer." + d, p.rows, p.swap, split=p.rows is not None or p.swap)
            for d, p in km.flux_to_diffusers(name)
        ]

    return names


def write_diffusers(lora: LoRA, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return write_with(lora, dtype, _diffusers_namer(lora), DIFFUSERS_STYLE, "diffusers")


# --- XLabs -----------------------------------------------------------------------------------------

_XLABS_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora([12]?)$")
_XLABS_DOUBLE = {("qkv", "1"): "img_attn.qkv", ("qkv", "2"): "txt_attn.qkv",
                 ("proj", "1"): "img_attn.proj", ("proj", "2"): "txt_attn.proj"}


def _xlabs_target(prefix: str) -> Target | None:
    m = _XLABS_RE.match(prefix)
    if not m:
        return None
    block, n, kind, stream = m.groups()
    if block == "double_blocks":
        leaf = _XLABS_DOUBLE.get((kind, stream))
        return Target(f"{km.DIFFUSION}double_blocks.{n}.{leaf}") if leaf else None
    if stream:
        return None
    if kind == "qkv":
        return Target(f"{km.DIFFUSION}single_blocks.{n}.linear1", rows=(0, 3))
    return Target(f"{km.DIFFUSION}single_blocks.{n}.linear2")


def detect_xlabs(keys: list[str]) -> int:
    return sum(".processor." in k and ("qkv_lora" in k or "proj_lora" in k) for k in keys)


def read_xlabs(src: TensorSource, arch: str | None) -> LoRA:
    lora = new_lora(src, "xlabs")
    groups, rest = group_keys(src.keys(), [(".down.weight", "down"), (".up.weight", "up"), (".alpha", "alpha")])
    lora.unknown_keys.extend(rest)
    assemble(src, groups, _xlabs_target, lora)
    return lora


# --- BFL control LoRAs and PEFT on BFL names --------------------------------------------------------


def _bfl_target(prefix: str) -> Target | None:
    return Target(km.DIFFUSION + prefix) if km.is_flux_module(prefix) else None


def detect_bfl_control(keys: list[str]) -> int:
    if not any(k.startswith(_BFL_ROOTS) and k.endswith(".lora_A.weight") for k in keys):
        return 0
    return sum(k.startswith(_BFL_ROOTS) for k in keys)


def read_bfl_control(src: TensorSource, arch: str | None) -> LoRA:
    lora = new_lora(src, "bfl_control")
    groups, rest = group_keys(src.keys(), PEFT_SUFFIXES)
    for k in rest:  # norm gains are stored whole: ComfyUI sets them (`set_weight`)
        if k.endswith("_norm.scale") and km.is_flux_module(k):
            lora.module(km.DIFFUSION + k).set_weight = src.get(k)
        else:
            lora.unknown_keys.append(k)
    assemble(src, groups, _bfl_target, lora)
    img_in = lora.modules.get(km.DIFFUSION + "img_in")
    if img_in is not None and img_in.terms:  # control LoRAs widen img_in; ComfyUI pads it (reshape_weight)
        import json

        from .formats_base import RESHAPE_META

        t = img_in.terms[0]
        shapes = json.loads(lora.metadata.get(RESHAPE_META, "{}"))
        shapes.setdefault(km.DIFFUSION + "img_in", [int(t.up.shape[0]), int(t.down.shape[1])])
        lora.metadata[RESHAPE_META] = json.dumps(shapes, sort_keys=True)
    return lora


def detect_peft_bfl(keys: list[str]) -> int:
    return sum(k.startswith("base_model.model.") and k[len("base_model.model."):].startswith(_BFL_ROOTS) for k in keys)


def read_peft_bfl(src: TensorSource, arch: str | None) -> LoRA:
    lora = new_lora(src, "peft_bfl")
    groups, rest = group_keys(src.keys(), PEFT_SUFFIXES)
    lora.unknown_keys.extend(rest)
    n = len("base_model.model.")
    assemble(src, groups, lambda p: _bfl_target(p[n:]) if p.startswith("base_model.model.") else None, lora,
             alpha_resolver(src.metadata))
    lora.metadata.pop(PEFT_KEY, None)
    return lora


NO_NAME_WHY["flux2"] = f2.why_no_name
register(Format("diffusers", "diffusers/PEFT/ai-toolkit: transformer.<diffusers name>.lora_A/lora_B (split q/k/v); "
                "SD: unet.<diffusers name>", detect_diffusers, read_diffusers, write_diffusers, namer=_diffusers_namer))
register(Format("xlabs", "XLabs: double_blocks.N.processor.qkv_lora1.down.weight … (read only)",
                detect_xlabs, read_xlabs))
register(Format("bfl_control", "BFL control LoRA: bare BFL names, lora_A/lora_B, lora_B.bias, norm scales (read only)",
                detect_bfl_control, read_bfl_control))
register(Format("peft_bfl", "PEFT on BFL names: base_model.model.<BFL name>.lora_A/lora_B (read only)",
                detect_peft_bfl, read_peft_bfl))
