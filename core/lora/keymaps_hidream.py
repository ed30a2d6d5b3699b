"""HiDream-I1 module names. ComfyUI's (`comfy/ldm/hidream`) are diffusers' (`HiDreamImageTransformer2DModel`) too:
diffusers' own LoRA converter only swaps `diffusion_model.` for `transformer.`. ComfyUI 0.3.75 maps them as
`diffusion_model.<name>`, `lora_unet_<name underscored>`, `transformer.<name>` (SimpleTuner's regular format) and
`lycoris_<name underscored>` (SimpleTuner's LyCORIS format), `.weight`s only for the last three. No weight is fused.
"""

from __future__ import annotations

import re

_N = r"\d+"
HIDREAM_MODULE_RE = re.compile(
    r"^(?:t_embedder\.timestep_embedder\.linear_[12]|p_embedder\.pooled_embedder\.linear_[12]|x_embedder\.proj"
    rf"|final_layer\.(?:linear|adaLN_modulation\.1)|caption_projection\.{_N}\.linear"
    rf"|(?:double|single)_stream_blocks\.{_N}\.block\.(?:adaLN_modulation\.1"
    r"|attn1\.(?:to_q|to_k|to_v|to_out|q_rms_norm|k_rms_norm)(?:_t)?"
    rf"|ff_i\.(?:shared_experts|experts\.{_N})\.w[123]|ff_i\.gate|ff_t\.w[123]))$"
)
# Names only HiDream has (x_embedder.proj and final_layer.* are SD3's too)
HIDREAM_ONLY_RE = re.compile(r"^(?:(?:double|single)_stream_blocks\.|caption_projection\.|p_embedder\.|t_embedder\.timestep_embedder\.)")


def is_hidream_module(name: str) -> bool:
    return bool(HIDREAM_MODULE_RE.match(name))


def is_hidream_only(name: str) -> bool:
    return bool(HIDREAM_ONLY_RE.match(name))
