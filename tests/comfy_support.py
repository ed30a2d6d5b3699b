"""The real ComfyUI, in-process: import it CPU-only, build real small models, apply LoRAs its own way.

Nothing here is mocked: models are `comfy.supported_models` configs turned into real `model_base`
objects wrapped in a real `ModelPatcher`, and LoRAs go through `comfy.lora_convert` / `comfy.lora`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def comfy_dir() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui" / "ComfyUI")


def import_comfy():
    """Import ComfyUI's modules with --cpu in force (a CUDA torch on a GPU-less machine would crash)."""
    d = comfy_dir()
    if not (d / "comfy").is_dir():
        raise RuntimeError(f"no ComfyUI at {d}; run scripts/setup_env.sh (or set COMFYUI_PATH)")
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    return comfy


def import_pack():
    """Import the node pack the way ComfyUI does (as a package from the repo root), after comfy."""
    import_comfy()
    name = "weightsmith_pack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _patcher(model):
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def flux_patcher(sd: dict[str, torch.Tensor], num_heads: int = 2):
    """A real comfy Flux / FluxSchnell / Chroma model (chosen by ComfyUI's own detection) from a small
    BFL-named state dict, with heads/axes adjusted so a narrow hidden size is allowed."""
    comfy = import_comfy()
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    if cfg is None:
        raise ValueError("ComfyUI does not detect this state dict as a DiT")
    hidden = cfg["hidden_size"]
    head_dim = hidden // num_heads
    third = head_dim // 8 * 2
    axes = [head_dim - 2 * third, third, third]
    cfg.update({"num_heads": num_heads, "axes_dim": axes})
    if cfg.get("image_model") == "chroma":
        approx = sd["distilled_guidance_layer.in_proj.weight"]
        n_layers = len({k.split(".")[2] for k in sd if k.startswith("distilled_guidance_layer.layers.")})
        cfg.update({"hidden_dim": approx.shape[0], "n_layers": n_layers, "out_dim": hidden, "in_dim": approx.shape[1]})
    mc = comfy.model_detection.model_config_from_unet_config(cfg, sd)
    if mc is None:
        raise ValueError(f"no ComfyUI model config matches {cfg}")
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model(dict(sd), "")
    model.load_model_weights(dict(sd), "")
    return _patcher(model)


def unet_patcher(sd: dict[str, torch.Tensor], kind: str):
    """A real comfy SD1.5 or SDXL UNet model from an LDM-named state dict (no prefix)."""
    comfy = import_comfy()
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    cls = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[kind]
    mc = cls(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model(dict(sd), "")
    model.load_model_weights(dict(sd), "")
    return _patcher(model)


TINY_QWEN = {"image_model": "qwen_image", "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
             "joint_attention_dim": 24, "axes_dims_rope": (4, 6, 6), "in_channels": 64}
TINY_WAN = {"image_model": "wan2.1", "dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 24,
            "freq_dim": 16, "out_dim": 16, "patch_size": (1, 2, 2), "window_size": (-1, -1), "qk_norm": True,
            "cross_attn_norm": True, "eps": 1e-6}


# Flux.2 as ComfyUI's detection configures it (model_detection.py), narrowed: hidden 32, 2 heads of 16.
TINY_FLUX2 = {"image_model": "flux2", "in_channels": 16, "hidden_size": 32, "context_in_dim": 24, "depth": 2,
              "depth_single_blocks": 2, "num_heads": 2, "axes_dim": [4, 4, 4, 4], "mlp_ratio": 3.0, "theta": 2000,
              "out_channels": 16, "global_modulation": True, "vec_in_dim": None, "mlp_silu_act": True, "qkv_bias": False,
              "ops_bias": False, "guidance_embed": True, "patch_size": 1, "default_ref_method": "index",
              "ref_index_scale": 10.0}


# Lumina 2 / Z-Image as ComfyUI's detection configures them, narrowed (dim 32, 2 heads of 16): Z-Image with as many
# key/value heads as query heads and its shared modulation; Lumina 2 with grouped-query attention (1 key/value head).
_TINY_LUMINA = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 32, "cap_feat_dim": 24, "n_layers": 2,
                "qk_norm": True, "n_heads": 2, "axes_dims": [4, 6, 6], "axes_lens": [64, 32, 32], "multiple_of": 16}
TINY_ZIMAGE = {**_TINY_LUMINA, "n_kv_heads": 2, "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
               "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}
TINY_LUMINA2 = {**_TINY_LUMINA, "n_kv_heads": 1, "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}


# HiDream as ComfyUI's detection configures it, narrowed: 2 heads of 16, 2 routed experts (1 active), 4 llama layers.
TINY_HIDREAM = {"image_model": "hidream", "attention_head_dim": 16, "axes_dims_rope": [8, 4, 4], "caption_channels": [24, 24],
                "max_resolution": [16, 16], "in_channels": 16, "llama_layers": [0, 1, 1, 1], "num_attention_heads": 2,
                "num_routed_experts": 2, "num_activated_experts": 1, "num_layers": 2, "num_single_layers": 2,
                "out_channels": 16, "patch_size": 2, "text_emb_dim": 20}


# SD3.5 Medium as ComfyUI's detection configures it (hidden = 64 · depth), narrowed to 2 joint blocks, the first
# with the extra self-attention (x_block.attn2).
TINY_SD3 = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None, "adm_in_channels": 24,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 20, "out_features": 128}},
            "num_patches": 64, "pos_embed_max_size": 8, "qk_norm": "rms", "pos_embed_scaling_factor": None,
            "x_block_self_attn_layers": [0]}


# Chroma Radiance as ComfyUI's detection configures it (pixel space, 16×16 patches, NeRF head), narrowed.
TINY_CHROMA_RADIANCE = {"image_model": "chroma_radiance", "axes_dim": [4, 6, 6], "num_heads": 2, "mlp_ratio": 4.0,
                        "theta": 10000, "qkv_bias": True, "hidden_size": 32, "context_in_dim": 24, "depth": 1,
                        "depth_single_blocks": 1, "in_channels": 3, "out_channels": 3, "in_dim": 16, "out_dim": 32,
                        "hidden_dim": 16, "n_layers": 1, "patch_size": 16, "nerf_hidden_size": 8, "nerf_mlp_ratio": 4,
                        "nerf_depth": 2, "nerf_max_freqs": 8, "nerf_tile_size": 512, "nerf_final_head_type": "linear",
                        "nerf_embedder_dtype": torch.float32}


def dit_config(kind: str):
    """(ComfyUI model-config class, tiny unet config) for a DiT kind of `dit_patcher`."""
    sm = import_comfy().supported_models
    return {"qwen": (sm.QwenImage, TINY_QWEN),
            "wan-t2v": (sm.WAN21_T2V, {**TINY_WAN, "model_type": "t2v", "in_dim": 16}),
            "wan-i2v": (sm.WAN21_I2V, {**TINY_WAN, "model_type": "i2v", "in_dim": 36}),
            "flux2": (sm.Flux2, TINY_FLUX2), "zimage": (sm.ZImage, TINY_ZIMAGE),
            "lumina2": (sm.Lumina2, TINY_LUMINA2), "hidream": (sm.HiDream, TINY_HIDREAM),
            "sd3": (sm.SD3, TINY_SD3), "chroma-radiance": (sm.ChromaRadiance, TINY_CHROMA_RADIANCE)}[kind]


def dit_patcher(kind: str, seed: int = 0, sd: dict[str, torch.Tensor] | None = None):
    """A real comfy Qwen-Image ('qwen'), Wan 2.1 T2V ('wan-t2v') or I2V ('wan-i2v'), Flux.2 ('flux2'), … model built
    from `comfy.supported_models` with a tiny config; its weights are random (seeded) unless `sd` is given.
    Returns (patcher, the diffusion model's state dict as ComfyUI holds it)."""
    cls, cfg = dit_config(kind)
    mc = cls(dict(cfg))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "")
    if sd is None:
        g = torch.Generator().manual_seed(seed)
        sd = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict(sd, strict=True)
    return _patcher(model), {k: v.detach().clone() for k, v in model.diffusion_model.state_dict().items()}


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)

    def matching(self, *needles: str) -> list[str]:
        return [m for m in self.messages if any(n in m for n in needles)]


def comfy_lora_patches(patcher, lora_sd: dict[str, torch.Tensor]):
    """Load a LoRA state dict exactly as LoraLoaderModelOnly does; returns (patches, not_loaded_messages)."""
    comfy = import_comfy()
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with LogCapture() as cap:
        converted = comfy.lora_convert.convert_lora(dict(lora_sd))
        patches = comfy.lora.load_lora(converted, key_map)
    return patches, cap.matching("lora key not loaded", "NOT LOADED")


def apply_lora(patcher, lora_sd: dict[str, torch.Tensor], strength: float = 1.0):
    """(patched clone, not-loaded messages, keys the model refused) through ComfyUI's own code path."""
    patches, missing = comfy_lora_patches(patcher, lora_sd)
    clone = patcher.clone()
    accepted = clone.add_patches(patches, strength)
    refused = [k for k in patches if k not in set(accepted)]
    return clone, missing, refused


def effective_weights(patcher, keys=None) -> dict[str, torch.Tensor]:
    """Each weight with the patcher's patches applied, in fp32, computed ComfyUI's way per key."""
    comfy = import_comfy()
    out = {}
    kp = patcher.get_key_patches("diffusion_model.")
    for k, entries in kp.items():
        short = k[len("diffusion_model."):]
        if keys is not None and short not in keys:
            continue
        w, conv = entries[0]
        t = conv(comfy.model_management.cast_to_device(w, torch.device("cpu"), torch.float32, copy=True), inplace=True)
        out[short] = comfy.lora.calculate_weight(entries[1:], t, k, intermediate_dtype=torch.float32)
    return out


def node_defaults(cls) -> dict:
    """Every widget input of a node class at its default (combos at their default or first choice)."""
    out = {}
    for section in ("required", "optional"):
        for name, (kind, *rest) in cls.INPUT_TYPES().get(section, {}).items():
            opts = rest[0] if rest else {}
            if isinstance(kind, list):
                out[name] = opts.get("default", kind[0] if kind else None)
            elif "default" in opts:
                out[name] = opts["default"]
    return out


def call_node(nodes: dict, name: str, **inputs):
    """Run node class `nodes[name]` as ComfyUI would: its widgets at their defaults, `inputs` on top."""
    cls = nodes[name]
    return getattr(cls(), cls.FUNCTION)(**{**node_defaults(cls), **inputs})
