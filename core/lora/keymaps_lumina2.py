"""Lumina 2 and Z-Image module names: ComfyUI's (`comfy/ldm/lumina`, NextDiT) and diffusers' (`ZImageTransformer2DModel`,
the names ComfyUI 0.3.75's `comfy.utils.z_image_to_diffusers` maps).

Both models share ComfyUI's layout: `layers.N`, `noise_refiner.N`, `context_refiner.N` blocks with a fused
`attention.qkv`; diffusers splits it into `attention.to_q/to_k/to_v` and renames `attention.out` -> `to_out.0`,
`q_norm`/`k_norm` -> `norm_q`/`norm_k`, `x_embedder` -> `all_x_embedder.2-1`, `final_layer` -> `all_final_layer.2-1`.
ComfyUI loads those diffusers names as `diffusion_model.<diffusers name>` (ai-toolkit's layout) and
`lycoris_<diffusers name underscored>` (SimpleTuner), not under `transformer.`. Its map cuts qkv into equal thirds,
which is right for Z-Image (as many key/value heads as query heads) and wrong for Lumina 2's grouped-query attention
(24 query, 8 key/value heads): for Lumina 2 the split names are refused.
"""

from __future__ import annotations

import re

from .keymaps import Piece

_BLOCK = r"(?:layers|noise_refiner|context_refiner)\.\d+\."
LUMINA_MODULE_RE = re.compile(
    r"^(?:x_embedder|cap_embedder\.[01]|t_embedder\.mlp\.[02]|final_layer\.linear|final_layer\.adaLN_modulation\.1"
    r"|norm_final|x_pad_token|cap_pad_token"
    rf"|{_BLOCK}(?:attention\.(?:qkv|out|q_norm|k_norm)|feed_forward\.w[123]|attention_norm[12]|ffn_norm[12]"
    r"|adaLN_modulation\.[01]))$"
)
# Names only Lumina 2 / Z-Image have (final_layer.*, t_embedder.* and x_embedder are SD3's or Flux-diffusers' too)
LUMINA_ONLY_RE = re.compile(rf"^(?:{_BLOCK}|cap_embedder\.|norm_final$|x_pad_token$|cap_pad_token$)")
# Whole parameters (not a layer's `.weight`): addressed by their own name, as ComfyUI's generic key map does
PARAMETERS = ("x_pad_token", "cap_pad_token")

_BLOCK_D2N = {
    "attention.to_q": ("attention.qkv", (0, 1)), "attention.to_k": ("attention.qkv", (1, 1)),
    "attention.to_v": ("attention.qkv", (2, 1)),
    "attention.norm_q": ("attention.q_norm", None), "attention.norm_k": ("attention.k_norm", None),
    "attention.to_out.0": ("attention.out", None),
    **{n: (n, None) for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2", "feed_forward.w1",
                              "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")},
}
_GLOBAL_D2N = {
    "all_final_layer.2-1.linear": "final_layer.linear",
    "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
    "all_x_embedder.2-1": "x_embedder",
    **{n: n for n in ("cap_embedder.0", "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2", "x_pad_token",
                      "cap_pad_token")},
}
_BLOCK_N2D: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
for _d, (_n, _r) in _BLOCK_D2N.items():
    _BLOCK_N2D.setdefault(_n, []).append((_d, _r))
_GLOBAL_N2D = {n: d for d, n in _GLOBAL_D2N.items()}
_BLOCK_NAME = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)$")
# diffusers names that differ from ComfyUI's (to recognise a diffusers-named file)
DIFFUSERS_ONLY_RE = re.compile(rf"^(?:{_BLOCK}attention\.(?:to_q|to_k|to_v|to_out\.0|norm_q|norm_k)$"
                               r"|all_x_embedder\.|all_final_layer\.)")


def is_lumina_module(name: str) -> bool:
    return bool(LUMINA_MODULE_RE.match(name))


def is_lumina_only(name: str) -> bool:
    return bool(LUMINA_ONLY_RE.match(name))


def is_diffusers_name(name: str) -> bool:
    """A Z-Image diffusers module name that differs from ComfyUI's."""
    return bool(DIFFUSERS_ONLY_RE.match(name))


def lumina_from_diffusers(name: str) -> Piece | None:
    """diffusers Z-Image module name -> ComfyUI piece (q/k/v: thirds of qkv), or None."""
    m = _BLOCK_NAME.match(name)
    if m:
        hit = _BLOCK_D2N.get(m.group(2))
        return Piece(f"{m.group(1)}.{hit[0]}", hit[1]) if hit else None
    if name in _GLOBAL_D2N:
        return Piece(_GLOBAL_D2N[name])
    return None


def lumina_to_diffusers(native: str) -> list[tuple[str, Piece]]:
    """ComfyUI module -> [(diffusers name, piece)]; empty when ComfyUI maps no diffusers name to it (norm_final,
    Lumina 2's adaLN_modulation.1)."""
    m = _BLOCK_NAME.match(native)
    if m:
        return [(f"{m.group(1)}.{d}", Piece(native, r)) for d, r in _BLOCK_N2D.get(m.group(2), [])]
    if native in _GLOBAL_N2D:
        return [(_GLOBAL_N2D[native], Piece(native))]
    return []
