"""Flux.2 module names: ComfyUI's (BFL's) and diffusers' `Flux2Transformer2DModel`, and which diffusers names
ComfyUI 0.3.75 loads.

Flux.2 keeps Flux's BFL layout for its blocks but drops the per-block modulations (three shared ones instead:
`double_stream_modulation_{img,txt}.lin`, `single_stream_modulation.lin`), the vector embedder and every bias;
its MLPs are SwiGLU with ratio 3, so `img_mlp.0` has 6·H rows and `single_blocks.N.linear1` is q|k|v|mlp = 9·H.

diffusers names the double blocks as for Flux (`attn.to_q` … split out of `qkv`) but the MLPs `ff.linear_in` /
`ff.linear_out`, and keeps `linear1` fused (`single_transformer_blocks.N.attn.to_qkv_mlp_proj`). ComfyUI 0.3.75
builds its Flux.2 LoRA key map from Flux's diffusers table (`comfy.utils.flux_to_diffusers`), so it loads a
diffusers Flux.2 name only where Flux's table has the same name for the same weight: the double blocks'
attention and the input/output projections. Everything else has no diffusers name ComfyUI loads.
"""

from __future__ import annotations

import re

from .keymaps import Piece, TwoStreamNames, flux_from_diffusers

_N = r"\d+"
FLUX2_ONLY_RE = re.compile(r"^(?:double_stream_modulation_(?:img|txt)\.lin|single_stream_modulation\.lin)$")
FLUX2_MODULE_RE = re.compile(
    r"^(?:img_in|txt_in|final_layer\.linear|final_layer\.adaLN_modulation\.1|(?:time_in|guidance_in)\.(?:in_layer|out_layer)"
    rf"|double_blocks\.{_N}\.(?:img|txt)_(?:attn\.qkv|attn\.proj|mlp\.0|mlp\.2)"
    rf"|double_blocks\.{_N}\.(?:img|txt)_attn\.norm\.(?:query|key)_norm\.scale"
    rf"|single_blocks\.{_N}\.(?:linear1|linear2|norm\.(?:query|key)_norm\.scale)"
    r"|double_stream_modulation_(?:img|txt)\.lin|single_stream_modulation\.lin)$"
)
# Rows of a Flux.2 weight in units of H (its input width) where they differ from Flux's: SwiGLU MLPs of ratio 3.
FLUX2_ROW_RATIOS = {"linear1": 9, "mlp.0": 6}

_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", (0, 1)), "attn.to_k": ("img_attn.qkv", (1, 1)), "attn.to_v": ("img_attn.qkv", (2, 1)),
    "attn.add_q_proj": ("txt_attn.qkv", (0, 1)), "attn.add_k_proj": ("txt_attn.qkv", (1, 1)),
    "attn.add_v_proj": ("txt_attn.qkv", (2, 1)),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None), "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None), "ff_context.linear_out": ("txt_mlp.2", None),
    "attn.norm_q": ("img_attn.norm.query_norm.scale", None), "attn.norm_k": ("img_attn.norm.key_norm.scale", None),
    "attn.norm_added_q": ("txt_attn.norm.query_norm.scale", None),
    "attn.norm_added_k": ("txt_attn.norm.key_norm.scale", None),
}
_SINGLE = {
    "attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None),
    "attn.norm_q": ("norm.query_norm.scale", None), "attn.norm_k": ("norm.key_norm.scale", None),
}
_GLOBAL = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}
FLUX2_NAMES = TwoStreamNames(_DOUBLE, _SINGLE, _GLOBAL)
# diffusers roots of Flux.2 names that Flux's diffusers names do not have (to recognise prefix-less files)
FLUX2_DIFFUSERS_ROOTS = ("time_guidance_embed.", "double_stream_modulation_", "single_stream_modulation.")
FLUX2_DIFFUSERS_ONLY_RE = re.compile(
    r"(?:^|\.)(?:attn\.to_qkv_mlp_proj|ff\.linear_(?:in|out)|ff_context\.linear_(?:in|out)|time_guidance_embed"
    r"|double_stream_modulation_(?:img|txt)\.linear|single_stream_modulation\.linear)(?:\.|$)")


def is_flux2_module(bfl: str) -> bool:
    return bool(FLUX2_MODULE_RE.match(bfl))


def is_flux2_only(bfl: str) -> bool:
    """Names only Flux.2 has (its shared modulations)."""
    return bool(FLUX2_ONLY_RE.match(bfl))


def flux2_from_diffusers(name: str) -> Piece | None:
    """diffusers Flux2Transformer2DModel module name (no `transformer.` prefix) -> BFL piece, or None."""
    return FLUX2_NAMES.from_diffusers(name)


def flux2_to_diffusers(bfl: str) -> list[tuple[str, Piece]]:
    """BFL module -> [(diffusers name, piece)] (q/k/v slices of a double block's qkv); empty when diffusers has no
    name for it."""
    return FLUX2_NAMES.to_diffusers(bfl)


def comfy_loads_flux2_diffusers(name: str, piece: Piece) -> bool:
    """Whether ComfyUI 0.3.75 maps the diffusers Flux.2 name `name` to this same piece (it maps Flux's table)."""
    return flux_from_diffusers(name) == piece


def flux2_diffusers_names(bfl: str) -> list[tuple[str, Piece]]:
    """The diffusers names a writer may give a Flux.2 module: diffusers' own, and only when ComfyUI 0.3.75 loads
    every one of them as the same weight; empty (refused, by name) otherwise."""
    names = flux2_to_diffusers(bfl)
    return names if names and all(comfy_loads_flux2_diffusers(d, p) for d, p in names) else []


def why_no_name(module: str, fmt: str) -> str | None:
    """Why a Flux.2 module gets no diffusers-style name: ComfyUI 0.3.75 does not load diffusers' own name for it."""
    bfl = module.removeprefix("diffusion_model.")
    names = [d for d, _ in flux2_to_diffusers(bfl)]
    if fmt in ("diffusers", "lycoris", "onetrainer") and names:
        return f"ComfyUI 0.3.75 does not load its diffusers Flux.2 name {names[0]}"
    return None
