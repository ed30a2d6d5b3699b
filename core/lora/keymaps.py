"""Module names across LoRA formats: canonical (ComfyUI-native) ↔ kohya / diffusers / OneTrainer names.

Canonical module names carry their component prefix: `diffusion_model.<BFL or LDM name>` for the
diffusion model, `text_encoders.<clip_l|clip_g|t5xxl>.transformer.<HF name>` for text encoders. A
canonical name normally denotes `<name>.weight`; names ending in `.scale` (Flux q/k RMSNorm gains)
denote that parameter itself, exactly as ComfyUI's key map treats them; so do names whose last part is
`modulation` (Wan's `blocks.N.modulation` / `head.modulation` parameters, addressable as `.diff` only).

diffusers splits some fused BFL weights: `to_q/to_k/to_v` are row slices of `qkv`, and the single
blocks' `to_q/to_k/to_v/proj_mlp` are row slices of `linear1`. A slice is given in units of the hidden
size H, `(start, length)`; H itself is recovered from the slice's own row count, so no model is needed.
`norm_out.linear` is BFL's `final_layer.adaLN_modulation.1` with its halves swapped (scale|shift vs
shift|scale).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DIFFUSION = "diffusion_model."
TEXT = "text_encoders."

# ---------------------------------------------------------------------------------------------------
# Canonical names


_PARAMETER_LEAVES = ("modulation", "x_pad_token", "cap_pad_token", "pos_embed")


def is_parameter_name(name: str) -> bool:
    """True for canonical names that denote a parameter itself rather than a layer's `.weight` (norm `.scale`s, Wan's
    `modulation`, Lumina 2 / Z-Image's pad tokens, SD3's `pos_embed`)."""
    return name.endswith(".scale") or name.rsplit(".", 1)[-1] in _PARAMETER_LEAVES


def weight_key(module: str) -> str:
    """The state-dict key a canonical module patches, without the component prefix for the diffusion
    model (`diffusion_model.double_blocks.0.img_attn.qkv` -> `double_blocks.0.img_attn.qkv.weight`)."""
    name = module[len(DIFFUSION):] if module.startswith(DIFFUSION) else module
    return name if is_parameter_name(name) else name + ".weight"


def bias_key(module: str) -> str:
    name = module[len(DIFFUSION):] if module.startswith(DIFFUSION) else module
    return name + ".bias"


def module_of_key(key: str) -> str | None:
    """Canonical diffusion-model module for a model weight key (`….weight` or a norm `….scale`)."""
    if key.endswith(".weight"):
        return DIFFUSION + key[: -len(".weight")]
    if is_parameter_name(key):
        return DIFFUSION + key
    return None


# ---------------------------------------------------------------------------------------------------
# Flux / Chroma (BFL names)

_N = r"(\d+)"
FLUX_MODULE_PATTERNS = [
    r"img_in", r"txt_in", r"final_layer\.linear", r"final_layer\.adaLN_modulation\.1",
    r"(time_in|vector_in|guidance_in)\.(in_layer|out_layer)",
    rf"double_blocks\.{_N}\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.0|mlp\.2|mod\.lin)",
    rf"double_blocks\.{_N}\.(img|txt)_attn\.norm\.(query|key)_norm\.scale",
    rf"single_blocks\.{_N}\.(linear1|linear2|modulation\.lin)",
    rf"single_blocks\.{_N}\.norm\.(query|key)_norm\.scale",
    rf"distilled_guidance_layer\.(in_proj|out_proj|layers\.{_N}\.(in_layer|out_layer)|norms\.{_N}\.scale)",
    # Chroma Radiance (pixel space): a patch conv instead of img_in, and the NeRF-style decoder head
    r"img_in_patch", r"nerf_image_embedder\.embedder\.0", rf"nerf_blocks\.{_N}\.(param_generator|norm\.scale)",
    r"nerf_final_layer\.(linear|norm\.scale)", r"nerf_final_layer_conv\.(conv|norm\.scale)",
]
_FLUX_RE = re.compile("^(?:" + "|".join(FLUX_MODULE_PATTERNS) + ")$")

# Layers Chroma removed (its modulations come from the distilled guidance layer instead).
_FLUX_MODULATION_RE = re.compile(
    r"^(?:double_blocks\.\d+\.(img|txt)_mod\.lin|single_blocks\.\d+\.modulation\.lin"
    r"|final_layer\.adaLN_modulation\.1|(time_in|vector_in|guidance_in)\.(in_layer|out_layer))$"
)

# Fused weights: total rows in units of H (qkv = q|k|v, linear1 = q|k|v|mlp with mlp ratio 4).
FUSED_ROWS = {"qkv": 3, "linear1": 7}


def is_flux_module(bfl: str) -> bool:
    return bool(_FLUX_RE.match(bfl))


def is_flux_modulation(bfl: str) -> bool:
    """True for the Flux-only layers Chroma does not have (modulations and the vector embedders)."""
    return bool(_FLUX_MODULATION_RE.match(bfl))


def is_chroma_only(bfl: str) -> bool:
    """Chroma's (and Chroma Radiance's) own layers: the guidance approximator, Radiance's patch conv and NeRF head."""
    return bfl.startswith(("distilled_guidance_layer.", "img_in_patch", "nerf_"))


def fused_rows(module: str, in_features: int) -> int | None:
    """Total rows of a fused weight (qkv, Flux's linear1) given its input width H, else None; only row slices need it
    (a whole-weight part tells the rows itself)."""
    leaf = module.rsplit(".", 1)[-1]
    mult = FUSED_ROWS.get(leaf)
    if mult is None or (leaf == "linear1" and not module.startswith(DIFFUSION + "single_blocks.")):
        return None
    return mult * in_features  # every fused `qkv` (Flux, Z-Image, SD3) with as many key/value heads as query heads


# diffusers FluxTransformer2DModel (and ChromaTransformer2DModel) name -> BFL name, with row slice
# (start, length) in units of H and whether the halves are swapped.
@dataclass(frozen=True)
class Piece:
    bfl: str  # BFL module name without prefix
    rows: tuple[int, int] | None = None  # (start, length) in units of H
    swap: bool = False  # rows are [scale | shift] in diffusers, [shift | scale] in BFL


_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", (0, 1)), "attn.to_k": ("img_attn.qkv", (1, 1)), "attn.to_v": ("img_attn.qkv", (2, 1)),
    "attn.add_q_proj": ("txt_attn.qkv", (0, 1)), "attn.add_k_proj": ("txt_attn.qkv", (1, 1)),
    "attn.add_v_proj": ("txt_attn.qkv", (2, 1)),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
    "attn.norm_q": ("img_attn.norm.query_norm.scale", None), "attn.norm_k": ("img_attn.norm.key_norm.scale", None),
    "attn.norm_added_q": ("txt_attn.norm.query_norm.scale", None),
    "attn.norm_added_k": ("txt_attn.norm.key_norm.scale", None),
}
_SINGLE = {
    "attn.to_q": ("linear1", (0, 1)), "attn.to_k": ("linear1", (1, 1)), "attn.to_v": ("linear1", (2, 1)),
    "proj_mlp": ("linear1", (3, 4)), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
    "attn.norm_q": ("norm.query_norm.scale", None), "attn.norm_k": ("norm.key_norm.scale", None),
}
_GLOBAL = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}
BlockTable = dict[str, tuple[str, "tuple[int, int] | None"]]  # diffusers suffix -> (BFL suffix, rows)
_DIFFUSERS_BLOCKS = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}
_BFL_BLOCKS = {b: d for d, b in _DIFFUSERS_BLOCKS.items()}


class TwoStreamNames:
    """diffusers <-> BFL names of a two-stream (double + single block) transformer: Flux and Flux.2 share this
    layout and its norm_out half swap, not their tables."""

    def __init__(self, double: BlockTable, single: BlockTable, globals_: dict[str, str]) -> None:
        self.tables = {"double_blocks": double, "single_blocks": single}
        self.inverse: dict[str, dict[str, list[tuple[str, tuple[int, int] | None]]]] = {}
        for block, table in self.tables.items():
            inv = self.inverse[block] = {}
            for d, (b, r) in table.items():
                inv.setdefault(b, []).append((d, r))
        self.globals = globals_
        self.globals_inv = {b: d for d, b in globals_.items()}

    def from_diffusers(self, name: str) -> Piece | None:
        """diffusers module name (no `transformer.` prefix) -> BFL piece, or None."""
        m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", name)
        if m:
            block = _DIFFUSERS_BLOCKS[m.group(1)]
            hit = self.tables[block].get(m.group(3))
            return None if hit is None else Piece(f"{block}.{m.group(2)}.{hit[0]}", hit[1])
        if name == "norm_out.linear":
            return Piece("final_layer.adaLN_modulation.1", None, swap=True)
        if name in self.globals:
            return Piece(self.globals[name])
        return None

    def to_diffusers(self, bfl: str) -> list[tuple[str, Piece]]:
        """BFL module -> [(diffusers name, piece)]: one entry, or the slices of a fused weight; empty when
        diffusers has no name for it."""
        m = re.match(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$", bfl)
        if m:
            prefix = _BFL_BLOCKS[m.group(1)]
            return [(f"{prefix}.{m.group(2)}.{d}", Piece(bfl, r)) for d, r in self.inverse[m.group(1)].get(m.group(3), [])]
        if bfl == "final_layer.adaLN_modulation.1":
            return [("norm_out.linear", Piece(bfl, None, swap=True))]
        if bfl in self.globals_inv:
            return [(self.globals_inv[bfl], Piece(bfl))]
        return []


FLUX_NAMES = TwoStreamNames(_DOUBLE, _SINGLE, _GLOBAL)


def flux_from_diffusers(name: str) -> Piece | None:
    """diffusers Flux/Chroma module name (no `transformer.` prefix) -> BFL piece, or None."""
    piece = FLUX_NAMES.from_diffusers(name)
    if piece is not None:
        return piece
    m = re.match(r"^distilled_guidance_layer\.(layers\.\d+)\.linear_([12])$", name)
    if m:
        return Piece(f"distilled_guidance_layer.{m.group(1)}.{'in_layer' if m.group(2) == '1' else 'out_layer'}")
    m = re.match(r"^distilled_guidance_layer\.norms\.(\d+)$", name)
    if m:
        return Piece(f"distilled_guidance_layer.norms.{m.group(1)}.scale")
    return None


def flux_to_diffusers(bfl: str) -> list[tuple[str, Piece]]:
    """BFL module -> [(diffusers name, piece)]: one entry, or the q/k/v(/mlp) slices of a fused weight.
    Empty when diffusers has no name for it."""
    names = FLUX_NAMES.to_diffusers(bfl)
    if names:
        return names
    m = re.match(r"^distilled_guidance_layer\.(layers\.\d+)\.(in_layer|out_layer)$", bfl)
    if m:
        return [(f"distilled_guidance_layer.{m.group(1)}.linear_{'1' if m.group(2) == 'in_layer' else '2'}", Piece(bfl))]
    m = re.match(r"^distilled_guidance_layer\.norms\.(\d+)\.scale$", bfl)
    if m:
        return [(f"distilled_guidance_layer.norms.{m.group(1)}", Piece(bfl))]
    return []


# ---------------------------------------------------------------------------------------------------
# Qwen-Image and Wan 2.1/2.2: ComfyUI's native names are the only ones these models have here. Qwen-Image's
# native names already are diffusers' (QwenImageTransformer2DModel), so its diffusers LoRA naming is
# `transformer.<native name>`; ComfyUI 0.3.75 maps no diffusers names for Wan (only `diffusion_model.*` and
# `lora_unet_*`).

QWEN_MODULE_RE = re.compile(
    r"^(?:img_in|txt_in|txt_norm|proj_out|norm_out\.linear|time_text_embed\.timestep_embedder\.linear_[12]"
    r"|transformer_blocks\.\d+\.(?:(?:img|txt)_mod\.1|(?:img|txt)_mlp\.net\.(?:0\.proj|2)"
    r"|attn\.(?:to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out"
    r"|norm_q|norm_k|norm_added_q|norm_added_k)))$"
)
# Names only Qwen-Image has (Flux's diffusers names share the attention projections and `img_in`-style roots).
QWEN_ONLY_RE = re.compile(r"^(?:txt_norm|transformer_blocks\.\d+\.(?:img_mod|txt_mod|img_mlp|txt_mlp)\.)")
WAN_MODULE_RE = re.compile(
    r"^(?:patch_embedding|text_embedding\.[02]|time_embedding\.[02]|time_projection\.1|head\.head"
    r"|img_emb\.proj\.[0134]|blocks\.\d+\.(?:(?:self_attn|cross_attn)\.(?:q|k|v|o|norm_q|norm_k|k_img|v_img|norm_k_img)"
    r"|ffn\.[02]|norm3|modulation)|head\.modulation)$"
)


def is_qwen_module(name: str) -> bool:
    return bool(QWEN_MODULE_RE.match(name))


def is_qwen_only(name: str) -> bool:
    return bool(QWEN_ONLY_RE.match(name))


def is_wan_module(name: str) -> bool:
    return bool(WAN_MODULE_RE.match(name))


def looks_qwen(names: list[str]) -> bool:
    """True when module names (no prefix) are Qwen-Image's rather than Flux's diffusers names: a Qwen-only layer,
    or double-stream blocks past Flux's 19 with no single-stream blocks at all."""
    if any(QWEN_ONLY_RE.match(n) for n in names):
        return True
    if any(n.startswith("single_transformer_blocks.") for n in names):
        return False
    idx = [int(m.group(1)) for n in names if (m := re.match(r"^transformer_blocks\.(\d+)\.", n))]
    return bool(idx) and max(idx) >= 19


# ---------------------------------------------------------------------------------------------------
# Underscored names (kohya, OneTrainer): dots become underscores, which loses where the dots were.
# The names are rebuilt by re-joining the multi-word tokens real layer names contain.

_COMPOUNDS = {
    # Flux / Chroma (BFL)
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
    "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer", "final_layer",
    "adaLN_modulation", "query_norm", "key_norm", "distilled_guidance_layer", "in_proj", "out_proj",
    # diffusers Flux
    "transformer_blocks", "single_transformer_blocks", "to_q", "to_k", "to_v", "to_out", "to_add_out",
    "add_q_proj", "add_k_proj", "add_v_proj", "ff_context", "norm1_context", "proj_mlp", "proj_out", "proj_in",
    "norm_out", "x_embedder", "context_embedder", "time_text_embed", "timestep_embedder", "text_embedder",
    "guidance_embedder", "linear_1", "linear_2", "norm_q", "norm_k", "norm_added_q", "norm_added_k",
    # SD UNets (LDM and diffusers)
    "input_blocks", "output_blocks", "middle_block", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb", "down_blocks", "up_blocks", "mid_block", "conv_shortcut", "time_emb_proj",
    "conv_in", "conv_out", "conv_norm_out", "time_embedding", "add_embedding",
    # text encoders
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "text_projection", "final_layer_norm",
    "wi_0", "wi_1", "relative_attention_bias", "layer_norm",
    # Qwen-Image and Wan (ComfyUI-native names)
    "txt_norm", "cross_attn", "k_img", "v_img", "norm_k_img", "patch_embedding", "text_embedding",
    "time_projection", "img_emb",
    # Flux.2 (BFL and diffusers names)
    "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation", "time_guidance_embed",
    "to_qkv_mlp_proj", "linear_in", "linear_out",
    # Lumina 2 / Z-Image (ComfyUI and diffusers names)
    "noise_refiner", "context_refiner", "feed_forward", "attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2",
    "q_norm", "k_norm", "norm_final", "x_pad_token", "cap_pad_token", "cap_embedder", "t_embedder", "all_x_embedder",
    "all_final_layer",
    # HiDream (ComfyUI = diffusers names)
    "double_stream_blocks", "single_stream_blocks", "to_q_t", "to_k_t", "to_v_t", "to_out_t", "q_rms_norm", "k_rms_norm",
    "q_rms_norm_t", "k_rms_norm_t", "ff_i", "ff_t", "shared_experts", "p_embedder", "pooled_embedder",
    "caption_projection",
    # SD3 / SD3.5 (ComfyUI MMDiT names; the diffusers ones are Flux's)
    "joint_blocks", "context_block", "x_block", "ln_q", "ln_k", "y_embedder", "pos_embed",
    # Chroma Radiance
    "img_in_patch", "nerf_image_embedder", "nerf_blocks", "param_generator", "nerf_final_layer", "nerf_final_layer_conv",
}
_MAX_COMPOUND = max(c.count("_") for c in _COMPOUNDS) + 1


def dotted(underscored: str) -> str:
    """`double_blocks_0_img_attn_qkv` -> `double_blocks.0.img_attn.qkv` (longest known tokens first)."""
    parts = underscored.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for n in range(min(_MAX_COMPOUND, len(parts) - i), 1, -1):
            cand = "_".join(parts[i : i + n])
            if cand in _COMPOUNDS:
                out.append(cand)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def underscored(name: str) -> str:
    return name.replace(".", "_")


# ---------------------------------------------------------------------------------------------------
# Text encoders

CLIP_LAYER_RE = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def te_name(encoder: str, hf_name: str) -> str:
    """Canonical text-encoder module (`clip_l`, `text_model.encoder.layers.0.mlp.fc1`)."""
    return f"{TEXT}{encoder}.transformer.{hf_name}"


def split_te(module: str) -> tuple[str, str] | None:
    """Canonical text-encoder module -> (encoder, HF name), or None for diffusion-model modules."""
    m = re.match(r"^text_encoders\.(clip_l|clip_g|clip_h|t5xxl)\.transformer\.(.+)$", module)
    return (m.group(1), m.group(2)) if m else None


def kohya_te_encoder(index: str, hf_name: str, arch: str) -> str:
    """Which encoder a kohya/OneTrainer `lora_te{index}_` prefix means (index '' for `lora_te_`)."""
    if hf_name.startswith("encoder."):  # T5 layout
        return "t5xxl"
    if index in ("", "1"):
        return "clip_l"
    return "clip_g"


def kohya_te_index(encoder: str, arch: str) -> str | None:
    """The `lora_te{index}_` index ComfyUI maps to `encoder` for `arch` ('' = `lora_te_`)."""
    if encoder == "clip_l":
        return "" if arch == "sd15" else "1"
    if encoder == "clip_g":
        return "2" if arch == "sdxl" else None
    if encoder == "t5xxl":
        return "1" if arch == "chroma" else "2"
    return None


def diffusers_te_prefix(encoder: str, arch: str) -> str | None:
    """`text_encoder{,_2}` for CLIP encoders; None for T5 (diffusers would name it `text_encoder_2`, but
    ComfyUI 0.3.75 maps no diffusers T5 names, so such a file would not load there)."""
    if encoder == "clip_l":
        return "text_encoder"
    if encoder == "clip_g" and arch == "sdxl":
        return "text_encoder_2"
    return None


def diffusers_te_encoder(prefix: str, hf_name: str, arch: str) -> str:
    if hf_name.startswith("encoder."):
        return "t5xxl"
    return "clip_l" if prefix == "text_encoder" else "clip_g"


# ---------------------------------------------------------------------------------------------------
# SD UNets: LDM (canonical) <-> diffusers names, through weightsmith.sdunet


SD_LAYOUT_META = "weightsmith.sd_layout"  # "<sd15|sdxl>/<tiny|small|full>": a LoRA made for a test-size UNet


def sd_layout(arch: str, metadata: dict[str, str] | None = None) -> str:
    """The UNet layout SD names are mapped with: the LoRA's recorded layout, else the real one of `arch`."""
    lay = (metadata or {}).get(SD_LAYOUT_META, "")
    return lay if lay.startswith(arch + "/") else arch


def _sd_maps(layout: str) -> tuple[dict[str, str], dict[str, str]]:
    """(ldm module -> diffusers module, diffusers module -> ldm module) for `layout` ('sd15', 'sdxl/tiny', …)."""
    hit = _SD_CACHE.get(layout)
    if hit is None:
        from .. import sdunet

        kind, _, size = layout.partition("/")
        l2d = sdunet.ldm_to_diffusers_unet(sdunet.sd_unet_config(kind, size) if size else kind)
        mods = {}
        for ldm_key, d_key in l2d.items():
            if ldm_key.endswith(".weight") and d_key.endswith(".weight"):
                mods[ldm_key[: -len(".weight")]] = d_key[: -len(".weight")]
        hit = (mods, {d: ldm for ldm, d in mods.items()})
        _SD_CACHE[layout] = hit
    return hit


_SD_CACHE: dict[str, tuple[dict[str, str], dict[str, str]]] = {}


def sd_to_diffusers(ldm: str, layout: str) -> str | None:
    return _sd_maps(layout)[0].get(ldm)


def sd_from_diffusers(name: str, layout: str) -> str | None:
    return _sd_maps(layout)[1].get(name)


SD_LDM_RE = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)\.")
SD_DIFFUSERS_RE = re.compile(r"^(down_blocks|mid_block|up_blocks|conv_in|conv_out|conv_norm_out|time_embedding|add_embedding)\b")
