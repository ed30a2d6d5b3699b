"""ComfyUI glue shared by every node: device choice, progress + interrupt, ModelPatcher weights as a
TensorSource, safe output paths in ComfyUI's folders, and report/picture outputs.

Nodes stay thin: they translate sockets and widgets into core calls through these helpers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import comfy.lora
import comfy.model_management as mm
import comfy.utils
import folder_paths
import numpy as np
import torch

from ..core.encodings.base import KeyEncoding
from ..core.errors import BadFileError
from ..core.paths import next_free_path
from ..core.safetensors_io import TensorInfo
from ..core.sources import TensorSource

LORA_TYPE = "LORA"  # socket type carrying a core.lora.LoRA between nodes
CATEGORY = "Weightsmith"
DIFFUSION_PREFIX = "diffusion_model."
# One strength range for every LoRA strength widget (Apply, Bake, Compose, Validate, Re-project): a value
# outside it is refused by ComfyUI's own validation when the prompt is queued, before anything runs.
STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
MAX_RANK = 4096  # one rank range for every rank widget (Extract, Compose, Re-rank, Re-project)


def compute_device(free_bytes: int = 0) -> torch.device:
    """The device ComfyUI gives us for math; frees VRAM for the work first (the CPU under --cpu)."""
    dev = mm.get_torch_device()
    if free_bytes:
        mm.free_memory(free_bytes, dev)
    mm.soft_empty_cache()
    return dev


def progress(total: int, node_id: str | None = None):
    """A core progress callback driving ComfyUI's bar; it also raises on Interrupt (the hook checks)."""
    pbar = comfy.utils.ProgressBar(max(total, 1), node_id=node_id)

    def update(done: int, total_: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done, max(total_, 1))

    return update


def _is_quantized(w: torch.Tensor) -> bool:
    return getattr(w, "_layout_type", None) is not None and hasattr(w, "_qdata")


def _dequantized(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A ComfyUI QuantizedTensor parameter (mixed-precision layers) dequantized by its own layout in `dtype`
    (its `dequantize()` would round to the model's compute dtype, bf16 on a GPU); None for plain tensors."""
    if not _is_quantized(w):
        return None
    layout = w._layout_type
    from comfy.quant_ops import LAYOUTS

    return LAYOUTS[layout].dequantize(w._qdata, **{**w._layout_params, "orig_dtype": dtype})


# Parameters of ComfyUI's fp8 Linear layers that are not weights: the convert function of the layer's
# `.weight` already applies the weight scale, and activation scales are not weights at all.
QUANT_PARAMS = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale")


def effective_weight(entries: list, device: torch.device, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One model's effective weight for `key` from its `get_key_patches` entries (original tensor plus its
    own patches), computed ComfyUI's way: the same recursion nested model patches go through. Quantized
    weights come out dequantized in `dtype` (scaled fp8 by the layer's convert function, mixed-precision
    QuantizedTensors by their layout)."""
    w, convert = entries[0]
    deq = _dequantized(w, dtype)
    if deq is not None:
        t = deq.to(device)
    else:
        t = convert(mm.cast_to_device(w, device, dtype, copy=True), inplace=True)
    if len(entries) > 1:
        t = comfy.lora.calculate_weight(entries[1:], t, key, intermediate_dtype=dtype)
    return t


class PatcherSource(TensorSource):
    """The diffusion model of a ModelPatcher as a TensorSource: `get(key)` is the effective weight of that
    clone (its own LoRAs and merges applied) computed ComfyUI's way for one key, in fp32 on `device`.
    Reading from `backup`-aware `get_key_patches` makes it immune to whatever is baked in the shared module.
    A quantized model's scale parameters are not keys: they are part of their weight's value."""

    def __init__(self, patcher, device: torch.device | None = None, name: str = "MODEL"):
        super().__init__()
        self.name = name
        self.patcher = patcher
        self.device = device or torch.device("cpu")
        self._kp = patcher.get_key_patches(DIFFUSION_PREFIX)
        self._encodings: dict[str, KeyEncoding] = {}
        for k, entries in self._kp.items():
            w = entries[0][0]
            if isinstance(w, torch.Tensor) and not _is_quant_param(k, self._kp):
                name = k[len(DIFFUSION_PREFIX):]
                enc = _model_encoding(k, w, self._kp)
                if enc is not None:
                    self._encodings[name] = enc
                self._infos[name] = TensorInfo(tuple(w.shape), torch.float32 if _is_quantized(w) else w.dtype)

    def encoding(self, key: str) -> KeyEncoding | None:
        self.info(key)
        return self._encodings.get(key)

    @torch.no_grad()  # ComfyUI's parameters may require grad: no autograd graph for a read
    def _load(self, key: str) -> torch.Tensor:
        full = DIFFUSION_PREFIX + key
        return effective_weight(self._kp[full], self.device, full)


def _model_encoding(key: str, w: torch.Tensor, keys) -> KeyEncoding | None:
    """How a loaded model holds a weight ComfyUI dequantizes: a mixed-precision QuantizedTensor, or an fp8
    weight with a `scale_weight` beside it (legacy scaled fp8). None for plain weights."""
    shape = tuple(w.shape)
    if _is_quantized(w):
        fmt = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}.get(w._qdata.dtype, w._layout_type)
        return KeyEncoding(f"comfy_quant:{fmt}", w._qdata.dtype, shape)
    if key.endswith(".weight") and key[: -len(".weight")] + ".scale_weight" in keys:
        return KeyEncoding("fp8_scaled", w.dtype, shape)
    return None


def _is_quant_param(key: str, keys) -> bool:
    """A scale parameter of a quantized Linear (`x.scale_weight` next to `x.weight`)."""
    for suffix in QUANT_PARAMS:
        if key.endswith(suffix) and key[: -len(suffix)] + ".weight" in keys:
            return True
    return False


def model_arch(patcher) -> str:
    """flux-dev / flux-schnell / chroma / sdxl / sd15 / unknown for a loaded MODEL."""
    import comfy.model_base as mb
    import comfy.supported_models as sm

    cfg = patcher.model.model_config
    if isinstance(cfg, sm.Chroma) or isinstance(patcher.model, getattr(mb, "Chroma", ())):
        return "chroma"
    if isinstance(cfg, sm.FluxSchnell):
        return "flux-schnell"
    if isinstance(cfg, sm.Flux):
        return "flux-dev"
    if isinstance(cfg, sm.SDXL):
        return "sdxl"
    if isinstance(cfg, sm.SD15):
        return "sd15"
    return "unknown"


FOLDERS = {"output": None, "loras": "loras", "diffusion_models": "diffusion_models", "checkpoints": "checkpoints"}
# Where a model file a node writes can go, in the same order on every node: diffusion_models first (the
# default, where Load Diffusion Model finds it), checkpoints (Load Checkpoint, for full checkpoints), output.
MODEL_OUTPUT_FOLDERS = ["diffusion_models", "checkpoints", "output"]
MODEL_OUTPUT_FOLDER_TOOLTIP = ("Where the file goes: diffusion_models (Load Diffusion Model lists it), checkpoints "
                               "(Load Checkpoint, for full checkpoints) or ComfyUI's output folder (no loader "
                               "lists it).")


def output_root(kind: str) -> Path:
    """The folder outputs of `kind` go to: ComfyUI's output dir, or the first path of a model folder."""
    if kind not in FOLDERS:
        raise ValueError(f"unknown output folder {kind!r}; choose one of {', '.join(FOLDERS)}")
    if FOLDERS[kind] is None:
        return Path(folder_paths.get_output_directory())
    paths = folder_paths.get_folder_paths(FOLDERS[kind])
    if not paths:
        raise ValueError(f"ComfyUI has no {kind} folder configured")
    root = Path(paths[0])
    root.mkdir(parents=True, exist_ok=True)
    return root


def output_path(kind: str, prefix: str, ext: str = ".safetensors") -> Path:
    """A fresh file in ComfyUI's `kind` folder for a user-given prefix (refuses `..`, absolute paths…)."""
    return next_free_path(output_root(kind), prefix, ext)


def input_path(folder: str, name: str) -> Path:
    """Full path of a file picked from a ComfyUI model folder list (a clear error if it is gone)."""
    return Path(folder_paths.get_full_path_or_raise(folder, name))


# The folders a model-file picker lists. ComfyUI's `diffusion_models` list includes the legacy `models/unet`
# folder (the "unet" name maps onto it), so a file in either shows as diffusion_models/<name>.
MODEL_FILE_FOLDERS = ("diffusion_models", "checkpoints")
MODEL_FILE_TOOLTIP = "diffusion_models/ (and unet/) or checkpoints/"


def _gguf_files(folder: str) -> list[str]:
    """.gguf files under a model folder: ComfyUI lists them only when ComfyUI-GGUF is installed."""
    names = set()
    for root in folder_paths.get_folder_paths(folder):
        files, _ = folder_paths.recursive_search(root, excluded_dir_names=[".git"])
        names.update(f for f in files if f.lower().endswith(".gguf"))
    return sorted(names)


def model_file_choices() -> list[str]:
    """Combo values of every model-file picker (Merge/Mix/Extract/Validate/Re-project/Bake): 'diffusion_models/<name>'
    (files in models/unet too; GGUF files included) and 'checkpoints/<name>'."""
    names = []
    for folder in MODEL_FILE_FOLDERS:
        listed = folder_paths.get_filename_list(folder)
        extra = [n for n in _gguf_files(folder) if n not in listed] if folder == "diffusion_models" else []
        names += [f"{folder}/{n}" for n in [*listed, *extra]]
    return names


def resolve_model_file(choice: str) -> Path:
    """Full path of a `model_file_choices()` value (a clear error for anything else)."""
    folder, _, name = choice.partition("/")
    if folder not in MODEL_FILE_FOLDERS or not name:
        raise BadFileError(f"{choice!r}: pick a file from diffusion_models/ or checkpoints/")
    return input_path(folder, name)


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """An RGB uint8 picture as a ComfyUI IMAGE batch [1, H, W, 3] in 0..1."""
    return torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]


def _json_safe(obj):
    """NaN/Inf are not JSON (the browser's JSON.parse rejects them): they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def ui_report(text: str, data: dict | None = None) -> dict:
    """The `ui` dict a node returns so the web extension can show the report in the node."""
    ui = {"weightsmith_report": [text]}
    if data is not None:
        ui["weightsmith_json"] = [json.dumps(_json_safe(json.loads(json.dumps(data, default=str))), allow_nan=False)]
    return ui
