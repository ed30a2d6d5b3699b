"""`weightsmith verify`: would ComfyUI load every key of this LoRA? Asked of ComfyUI's own code.

ComfyUI is imported lazily here, and only here in the core: from $COMFYUI_PATH or the repo's
`.comfyui/ComfyUI`, CPU-only. The model whose key map is used is the real architecture built on the
`meta` device (no memory, no weights) from its shapes, or the layout of a model file given with --model.
Text-encoder key maps come from the encoders' key names.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from ..errors import BadFileError, WeightsmithError
from ..report import an_arch

_CLIP_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_T5_PARTS = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.0.SelfAttention.o",
             "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wo")
_ENCODERS = {"sd15": {"clip_l": 12}, "sdxl": {"clip_l": 12, "clip_g": 32}, "flux": {"clip_l": 12, "t5xxl": 24},
             "chroma": {"t5xxl": 24}}


def import_comfy():
    root = Path(__file__).resolve().parents[2]
    d = Path(os.environ.get("COMFYUI_PATH") or root / ".comfyui" / "ComfyUI")
    if not (d / "comfy").is_dir():
        raise WeightsmithError(f"verify needs ComfyUI: none at {d}; set COMFYUI_PATH to a ComfyUI checkout")
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # a CUDA build of torch without a GPU would crash otherwise
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection

    return comfy


def _arch_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    from ..testmodels import FLUX_FULL, flux_shapes

    if arch in ("flux", "chroma"):
        return flux_shapes(FLUX_FULL, "dev" if arch == "flux" else "chroma")
    from ..sdunet import sd_unet_shapes

    return sd_unet_shapes(arch, "full")


def meta_model(comfy, shapes: dict[str, tuple[int, ...]], arch: str):
    """The real comfy model for these weight shapes, on the meta device (no memory)."""
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    if cfg is None:
        raise BadFileError(f"ComfyUI does not recognise {an_arch(arch)} model in these weights")
    if cfg.get("image_model") in ("flux", "chroma") and cfg.get("hidden_size") != 3072:
        heads = 2  # narrow test models: ComfyUI hard-codes 24 heads x 128, so pick heads that divide the width
        hd = cfg["hidden_size"] // heads
        third = hd // 8 * 2
        cfg.update({"num_heads": heads, "axes_dim": [hd - 2 * third, third, third]})
    if cfg.get("image_model") == "chroma":
        approx = shapes["distilled_guidance_layer.in_proj.weight"]
        layers = len({k.split(".")[2] for k in shapes if k.startswith("distilled_guidance_layer.layers.")})
        cfg.update({"hidden_dim": approx[0], "n_layers": layers, "out_dim": cfg["hidden_size"], "in_dim": approx[1]})
    if arch in ("sd15", "sdxl"):
        import comfy.supported_models as sm

        mc = (sm.SD15 if arch == "sd15" else sm.SDXL)(cfg)
    else:
        mc = comfy.model_detection.model_config_from_unet_config(cfg, sd)
    if mc is None:
        raise BadFileError(f"ComfyUI has no model config for these {arch} weights")
    with torch.device("meta"):
        return mc.get_model({}, "", device=torch.device("meta"))


class _Keys:
    """What `comfy.lora.model_lora_keys_clip` reads of a text-encoder model: its state dict keys."""

    def __init__(self, keys: list[str]):
        self._keys = dict.fromkeys(keys)

    def state_dict(self):
        return self._keys


def _te_keys(arch: str) -> list[str]:
    keys = []
    for enc, n in _ENCODERS.get(arch, {}).items():
        for i in range(n):
            if enc == "t5xxl":
                keys += [f"t5xxl.transformer.encoder.block.{i}.{p}.weight" for p in _T5_PARTS]
            else:
                keys += [f"{enc}.transformer.text_model.encoder.layers.{i}.{p}.weight" for p in _CLIP_LAYER_PARTS]
        if enc.startswith("clip"):
            keys.append(f"{enc}.transformer.text_projection.weight")
    return keys


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _shape_problems(patches: dict, model_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """LoRA factors whose product would not fit the weight they patch (ComfyUI only warns at sampling)."""
    bad = []
    for target, patch in patches.items():
        key, offset = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
        shape = model_shapes.get(key)
        weights = getattr(patch, "weights", None)
        if shape is None or not weights or not isinstance(weights[0], torch.Tensor) or type(patch).__name__ != "LoRAAdapter":
            continue
        up, down = weights[0], weights[1]
        rows = offset[2] if offset else shape[0] if shape else 1
        if len(shape) < 2 or up.shape[0] != rows or down.shape[1] != shape[1]:
            bad.append(f"{key}: ΔW {up.shape[0]}x{down.shape[1]} does not fit weight {tuple(shape)}"
                       + (f" rows {offset[1]}..{offset[1] + offset[2]}" if offset else ""))
    return bad


def verify(lora_sd: dict[str, torch.Tensor], arch: str, model_shapes: dict[str, tuple[int, ...]] | None = None,
           lora_name: str = "the LoRA", model_name: str = "the model") -> dict:
    """{'not_loaded': [...], 'loaded': n, 'shape_errors': [...]} as ComfyUI's LoraLoader would see it."""
    comfy = import_comfy()
    shapes = model_shapes or _arch_shapes(arch)
    try:
        model = meta_model(comfy, shapes, arch)
    except WeightsmithError as e:
        raise BadFileError(f"{model_name}: {e}; give the {arch} model file the LoRA is for") from None
    except Exception as e:  # ComfyUI's detection assumes a well-formed model: odd shapes fail anywhere in it
        raise BadFileError(f"{model_name}: ComfyUI cannot build {an_arch(arch)} model from this file's layout "
                           f"({type(e).__name__}: {e}); give the {arch} model file the LoRA is for") from None
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    key_map = comfy.lora.model_lora_keys_clip(_Keys(_te_keys(arch)), key_map)
    cap = _Capture()
    root = logging.getLogger()
    others = list(root.handlers)  # ComfyUI's warnings are collected, not printed twice
    for h in others:
        root.removeHandler(h)
    root.addHandler(cap)
    try:
        converted = comfy.lora_convert.convert_lora(dict(lora_sd))
        patches = comfy.lora.load_lora(converted, key_map)
    except Exception as e:  # what ComfyUI itself would do with this file: fail while loading it
        raise BadFileError(f"{lora_name}: ComfyUI's LoRA loader fails on this file ({type(e).__name__}: {e}), so "
                           "ComfyUI cannot apply it; re-export the LoRA, or convert it with `weightsmith convert`") from None
    finally:
        root.removeHandler(cap)
        for h in others:
            root.addHandler(h)
    prefix = "lora key not loaded: "
    missing = [m[len(prefix):] for m in cap.messages if m.startswith(prefix)]
    full_shapes = {"diffusion_model." + k: tuple(s) for k, s in shapes.items()}
    return {"not_loaded": missing, "loaded": len(patches), "shape_errors": _shape_problems(patches, full_shapes)}
