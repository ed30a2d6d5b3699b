"""Quantized weight encodings: detected from a file's header, decoded per tensor on read.

`decode_source(raw)` looks at key names, dtypes, shapes and metadata (and the few bytes of per-layer
`comfy_quant` configs) and returns `raw` itself when nothing is encoded, else a `DecodedSource`: the
plain model the file stands for, encoded weights read as fp32 in their logical shape, scale tensors not
keys. Encodings it recognises but cannot decode exactly are refused here (`UnsupportedEncodingError`,
naming file, layer and format), so no capability ever treats a payload or a scale as a weight.

Modules: `scaled_fp8` (ComfyUI legacy), `comfy_quant` (ComfyUI mixed precision), `diffusers_fp8`
(`weight_scale` without a ComfyUI config), `refuse` (recognised, not decodable). Detectors run in that
order after `refuse`; a weight the first claims is not looked at again.
"""

from __future__ import annotations

from ..sources import TensorSource
from . import comfy_quant, diffusers_fp8, refuse, scaled_fp8
from .base import DecodedSource, Detection, KeyEncoding, plain_label, register_label

DETECTORS = (comfy_quant.detect, scaled_fp8.detect, diffusers_fp8.detect)


def detect(raw: TensorSource) -> Detection:
    refuse.check(raw)
    found = Detection()
    for det in DETECTORS:
        d = det(raw, set(found.recipes))
        found.recipes.update(d.recipes)
        found.hidden |= d.hidden
    return found


def decode_source(raw: TensorSource) -> TensorSource:
    """`raw` when it holds no encoded tensor, else its decoded view (see the module docstring)."""
    if isinstance(raw, DecodedSource):
        return raw
    found = detect(raw)
    if not found and comfy_quant.METADATA_KEY not in raw.metadata:
        return raw
    return DecodedSource(raw, found)


def decoded_summary(source: TensorSource) -> dict[str, dict]:
    """encoding label -> {"count": n, "keys": [...]} for the keys `source` decodes (empty for plain files):
    what reports list as "decoded from"."""
    out: dict[str, dict] = {}
    for k in source.keys():
        e = source.encoding(k)
        if e is not None:
            entry = out.setdefault(e.label, {"format": e.format, "count": 0, "keys": []})
            entry["count"] += 1
            entry["keys"].append(k)
    return out


__all__ = ["DecodedSource", "KeyEncoding", "decode_source", "decoded_summary", "detect", "plain_label",
           "register_label"]
