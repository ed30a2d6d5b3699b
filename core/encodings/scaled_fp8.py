"""ComfyUI's legacy "scaled fp8" files.

Layout (ComfyUI 0.3.75 `comfy/model_detection.py` and `comfy/ops.py` `scaled_fp8_ops`): a marker tensor
`scaled_fp8` (`<prefix>scaled_fp8` in full checkpoints and text encoders) whose dtype is the fp8 kind (fp32
means e4m3fn) and whose 2 elements, when there are 2, turn off the fp8 matmul; per Linear layer
`<layer>.weight` (fp8) and `<layer>.scale_weight` (fp32), optionally `<layer>.scale_input` (an activation
scale for fp8 matmuls). ComfyUI computes the weight as `weight.to(float32) * scale_weight`. ComfyUI writes
a scalar scale; other writers store [1], [out, 1] or [out, in/block, 1]: all are decoded (`scale_broadcast`).
A `.scale_weight` needs no marker to be read: without one ComfyUI would ignore it and use the raw fp8
payload as the weight, a silent error this view does not repeat.
"""

from __future__ import annotations

from ..errors import BadFileError
from ..sources import TensorSource
from .base import Detection, KeyEncoding, ScaledWeight, check_scale

FORMAT = "fp8_scaled"
MARKER = "scaled_fp8"
SCALE = ".scale_weight"
INPUT_SCALE = ".scale_input"
EXTRA_SCALE = ".scale_weight_tensor"  # a copy of the scale some writers add; never a weight


def markers(source: TensorSource) -> list[str]:
    """The marker tensors: `scaled_fp8` or `<prefix>scaled_fp8`, at most 2 elements."""
    return [k for k in source.keys()
            if (k == MARKER or k.endswith("." + MARKER)) and source.info(k).numel <= 2]


def _marker_of(layer: str, marks: list[str]) -> str | None:
    """The marker whose prefix holds `layer` (the longest, in a checkpoint with several parts)."""
    best = None
    for m in marks:
        prefix = m[: -len(MARKER)]
        if layer.startswith(prefix) and (best is None or len(prefix) > len(best) - len(MARKER)):
            best = m
    return best


def detect(source: TensorSource, claimed: set[str]) -> Detection:
    found = Detection()
    marks = markers(source)
    found.hidden.update(marks)
    keys = set(source.keys())
    layers: dict[str, None] = {}  # in file order
    for k in source.keys():
        for suffix in (SCALE, INPUT_SCALE):
            if k.endswith(suffix):
                layers[k[: -len(suffix)]] = None
    for layer in layers:
        wk, sk, ik = layer + ".weight", layer + SCALE, layer + INPUT_SCALE
        if wk in claimed:
            continue
        if wk not in keys:
            what = sk if sk in keys else ik
            raise BadFileError(f"{source.name}: {what!r} belongs to a layer with no weight {wk!r}; the file is "
                               "incomplete or damaged: download it again or re-export it")
        side = {}
        if ik in keys:
            side["input_scale"] = ik
        if layer + EXTRA_SCALE in keys:
            side["scale_weight_tensor"] = layer + EXTRA_SCALE
        m = _marker_of(layer, marks)
        if m is not None:
            side["marker"] = m
        info = source.info(wk)
        if sk in keys:
            how = check_scale(source, layer, "fp8 scaled (legacy)", wk, sk)
            enc = KeyEncoding(FORMAT, info.dtype, info.shape, side, source.info(sk).shape)
            found.recipes[wk] = ScaledWeight(enc, wk, sk, how)
        else:  # an activation scale alone: the weight is unscaled (scale 1, as ComfyUI's default)
            enc = KeyEncoding(FORMAT, info.dtype, info.shape, side, None)
            found.recipes[wk] = ScaledWeight(enc, wk, None, "none")
        found.hidden.update(k for k in (sk, ik, layer + EXTRA_SCALE) if k in keys)
    return found
