"""SD3 / SD3.5 (MMDiT) module names: ComfyUI's (`joint_blocks.N.{x,context}_block…`) and diffusers'
(`SD3Transformer2DModel`), as ComfyUI 0.3.75's `comfy.utils.mmdit_to_diffusers` maps them.

diffusers splits each fused `attn.qkv` (and SD3.5 Medium's `x_block.attn2.qkv`) into thirds; the context stream
gets `add_q_proj`…; `norm_out.linear` and the last block's `norm1_context.linear` (its context block is "pre-only":
shift|scale, 2·H rows) hold their halves swapped. ComfyUI loads these names under `transformer.`, `base_model.model.`,
`lora_transformer_` (OneTrainer) and `lycoris_` (SimpleTuner), `.weight`s only.
"""

from __future__ import annotations

import re

from .keymaps import Piece

_N = r"\d+"
SD3_MODULE_RE = re.compile(
    r"^(?:x_embedder\.proj|pos_embed|t_embedder\.mlp\.[02]|y_embedder\.mlp\.[02]|context_embedder|final_layer\.linear"
    r"|final_layer\.adaLN_modulation\.1"
    rf"|joint_blocks\.{_N}\.(?:context_block|x_block)\.(?:adaLN_modulation\.1|attn\.(?:qkv|proj|ln_q|ln_k)|mlp\.fc[12])"
    rf"|joint_blocks\.{_N}\.x_block\.attn2\.(?:qkv|proj|ln_q|ln_k))$"
)
SD3_ONLY_RE = re.compile(r"^(?:joint_blocks\.|y_embedder\.|pos_embed$)")

_BLOCK = {
    "attn.to_q": ("x_block.attn.qkv", (0, 1)), "attn.to_k": ("x_block.attn.qkv", (1, 1)),
    "attn.to_v": ("x_block.attn.qkv", (2, 1)),
    "attn.add_q_proj": ("context_block.attn.qkv", (0, 1)), "attn.add_k_proj": ("context_block.attn.qkv", (1, 1)),
    "attn.add_v_proj": ("context_block.attn.qkv", (2, 1)),
    "attn2.to_q": ("x_block.attn2.qkv", (0, 1)), "attn2.to_k": ("x_block.attn2.qkv", (1, 1)),
    "attn2.to_v": ("x_block.attn2.qkv", (2, 1)),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
    "attn.norm_added_q": ("context_block.attn.ln_q", None), "attn.norm_added_k": ("context_block.attn.ln_k", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None), "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.norm_q": ("x_block.attn.ln_q", None), "attn.norm_k": ("x_block.attn.ln_k", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None), "attn2.norm_q": ("x_block.attn2.ln_q", None),
    "attn2.norm_k": ("x_block.attn2.ln_k", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
}
_GLOBAL = {
    "context_embedder": "context_embedder", "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
}
_BLOCK_INV: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
for _d, (_n, _r) in _BLOCK.items():
    _BLOCK_INV.setdefault(_n, []).append((_d, _r))
_GLOBAL_INV = {n: d for d, n in _GLOBAL.items()}
# Modulations whose halves diffusers swaps: the final layer's, and a pre-only context block's (2·H rows)
PRE_ONLY_ROWS = 2


def is_sd3_module(name: str) -> bool:
    return bool(SD3_MODULE_RE.match(name))


def is_sd3_only(name: str) -> bool:
    return bool(SD3_ONLY_RE.match(name))


def sd3_from_diffusers(name: str, pre_only: bool = False) -> Piece | None:
    """diffusers SD3 module name -> ComfyUI piece; `pre_only`: the weight has 2·H rows (the last context block's
    modulation, swapped like norm_out)."""
    m = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", name)
    if m:
        hit = _BLOCK.get(m.group(2))
        if hit is None:
            return None
        swap = pre_only and m.group(2) == "norm1_context.linear"
        return Piece(f"joint_blocks.{m.group(1)}.{hit[0]}", hit[1], swap)
    if name == "norm_out.linear":
        return Piece("final_layer.adaLN_modulation.1", None, swap=True)
    if name in _GLOBAL:
        return Piece(_GLOBAL[name])
    return None


def sd3_to_diffusers(native: str, pre_only: bool = False) -> list[tuple[str, Piece]]:
    """ComfyUI SD3 module -> [(diffusers name, piece)]; empty for `pos_embed` (ComfyUI maps no diffusers name to it)."""
    m = re.match(r"^joint_blocks\.(\d+)\.(.+)$", native)
    if m:
        swap = pre_only and m.group(2) == "context_block.adaLN_modulation.1"
        return [(f"transformer_blocks.{m.group(1)}.{d}", Piece(native, r, swap))
                for d, r in _BLOCK_INV.get(m.group(2), [])]
    if native == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", Piece(native, None, swap=True))]
    if native in _GLOBAL_INV:
        return [(_GLOBAL_INV[native], Piece(native))]
    return []


def looks_sd3(names: list[str], width: int | None) -> bool:
    """diffusers names (no prefix) that are SD3's rather than Flux's / Qwen-Image's: SD3-only layers (`attn2.`,
    `pos_embed.proj`), or an attention width of 64 per block (SD3's hidden size is 64 · depth) over all the blocks."""
    if any(re.match(r"^transformer_blocks\.\d+\.attn2\.", n) or n.startswith("pos_embed.") for n in names):
        return True
    if any(n.startswith("single_transformer_blocks.") for n in names):
        return False
    idx = [int(m.group(1)) for n in names if (m := re.match(r"^transformer_blocks\.(\d+)\.", n))]
    return bool(idx) and width == 64 * (max(idx) + 1)
