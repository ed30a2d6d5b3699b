"""ComfyUI "mixed precision" files: some layers quantized, named per layer.

Two forms name a layer's format:
* ComfyUI 0.3.75 (`comfy/model_detection.py` `detect_layer_quantization`): safetensors metadata
  `_quantization_metadata` = JSON {"format_version": …, "layers": {"<layer>": {"format": "<fmt>"}}}, layer
  names relative to the model the weights load into (a full checkpoint's `model.diffusion_model.` prefix
  is not part of them);
* later ComfyUI: a per-layer `<layer>.comfy_quant` uint8 tensor holding the same {"format": …} JSON
  (read at detection: a few bytes per layer, the only data detection ever reads).

Each quantized layer has `<layer>.weight` in the format's storage dtype and `<layer>.weight_scale`, and
may have `<layer>.input_scale`. ComfyUI 0.3.75's `comfy/quant_ops.py` defines one format, float8_e4m3fn
(TensorCoreFP8Layout: W = weight.to(dtype) · weight_scale, a per-tensor scale). float8_e5m2, defined by later
ComfyUI with the same per-tensor layout, is decoded the same way. The packed and block-scaled formats of
later versions (nvfp4, mxfp8, int8_tensorwise, awq…) take their layouts from comfy_kitchen, which 0.3.75
does not have: they are refused, naming file, layer and format, rather than guessed.
"""

from __future__ import annotations

import json

import torch

from ..errors import BadFileError, UnsupportedEncodingError
from ..sources import TensorSource
from .base import Detection, KeyEncoding, ScaledWeight, check_scale

METADATA_KEY = "_quantization_metadata"
CONFIG = ".comfy_quant"
SCALE = ".weight_scale"
INPUT_SCALE = ".input_scale"

# format -> the payload dtype ComfyUI stores it in (QUANT_ALGOS' storage_t)
DECODABLE = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def _metadata_layers(source: TensorSource) -> dict[str, dict]:
    raw = source.metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
        layers = data["layers"]
        if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
            raise ValueError("'layers' must map layer names to objects")
    except (ValueError, KeyError, TypeError) as e:
        raise BadFileError(f"{source.name}: metadata {METADATA_KEY} is not valid ComfyUI quantization metadata "
                           f"({e}); the file is damaged: download it again or re-export it") from None
    return layers


def _tensor_config(source: TensorSource, key: str) -> dict:
    t = source.get(key)
    try:
        conf = json.loads(t.contiguous().view(torch.uint8).numpy().tobytes().decode("utf-8"))
        if not isinstance(conf, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError, RuntimeError) as e:
        raise BadFileError(f"{source.name}: {key!r} does not hold a ComfyUI layer config as UTF-8 JSON ({e}); "
                           "the file is damaged: download it again or re-export it") from None
    return conf


def _weight_key(source: TensorSource, layer: str, keys: set[str]) -> str:
    """The raw weight key of a metadata layer name: `<layer>.weight`, else the one key ending in
    `.<layer>.weight` (metadata names leave out a checkpoint's part prefix)."""
    exact = layer + ".weight"
    if exact in keys:
        return exact
    hits = [k for k in keys if k.endswith("." + exact)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise BadFileError(f"{source.name}: {METADATA_KEY} names layer {layer!r}, but the file has no weight "
                           f"{exact!r}; the file is incomplete or its metadata is wrong: re-export it")
    raise BadFileError(f"{source.name}: {METADATA_KEY} layer {layer!r} matches several weights "
                       f"({', '.join(sorted(hits)[:4])}); the metadata is ambiguous: re-export the file")


def _refuse(source: TensorSource, bad: dict[str, str]) -> None:
    layer, fmt = next(iter(bad.items()))
    others = len(bad) - 1
    raise UnsupportedEncodingError(
        f"{source.name}: layer {layer!r} is stored as ComfyUI mixed-precision format {fmt!r}"
        + (f" ({others} more layers use formats this pack cannot decode)" if others else "")
        + "; this pack decodes the tensor-wise fp8 formats (float8_e4m3fn, float8_e5m2) of ComfyUI 0.3.75's "
        "layouts, and cannot decode this one exactly. Use a bf16 or fp8 version of the model")


def detect(source: TensorSource, claimed: set[str]) -> Detection:
    found = Detection()
    keys = set(source.keys())
    # layer -> (format, raw weight key, raw config key or None), in file order for the tensor form
    layers: dict[str, tuple[str, str, str | None]] = {}
    for k in source.keys():
        if k.endswith(CONFIG):
            layer = k[: -len(CONFIG)]
            conf = _tensor_config(source, k)
            wk = layer + ".weight"
            if wk not in keys:
                raise BadFileError(f"{source.name}: {k!r} configures a layer with no weight {wk!r}; the file is "
                                   "incomplete or damaged: download it again or re-export it")
            layers[layer] = (str(conf.get("format")), wk, k)
            found.hidden.add(k)
    for layer, conf in _metadata_layers(source).items():
        wk = _weight_key(source, layer, keys)
        layer = wk[: -len(".weight")]
        if layer not in layers:
            layers[layer] = (str(conf.get("format")), wk, None)
    bad = {layer: fmt for layer, (fmt, _, _) in layers.items() if fmt not in DECODABLE}
    if bad:
        _refuse(source, bad)
    for layer, (fmt, wk, ck) in layers.items():
        if wk in claimed:
            continue
        sk, ik = layer + SCALE, layer + INPUT_SCALE
        if sk not in keys:  # ComfyUI 0.3.75 fails on it too (it multiplies by a missing scale)
            raise BadFileError(f"{source.name}: layer {layer!r} is marked {fmt} but has no {sk!r}; the file is "
                               "incomplete or damaged: download it again or re-export it")
        how = check_scale(source, layer, f"comfy_quant:{fmt}", wk, sk)
        side = {role: key for role, key in (("input_scale", ik), ("comfy_quant", ck)) if key is not None and key in keys}
        info = source.info(wk)
        enc = KeyEncoding(f"comfy_quant:{fmt}", info.dtype, info.shape, side, source.info(sk).shape)
        found.recipes[wk] = ScaledWeight(enc, wk, sk, how)
        found.hidden.update(k for k in (sk, ik) if k in keys)
    return found
