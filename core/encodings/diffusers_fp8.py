"""fp8 weights with a `<layer>.weight_scale` and no ComfyUI layer config (diffusers / compressed-tensors
style fp8 exports, and ComfyUI files whose config was lost): W = weight.float() · weight_scale, the scale per
tensor, per output row ([out], [out, 1]) or per block. `<layer>.input_scale` is an activation scale, kept
as a side tensor. An int8 payload with a `weight_scale` is refused (its zero points and grouping are not
named in the file); a float payload with a tensor called `weight_scale` is not an encoding and stays as is.
"""

from __future__ import annotations

from ..errors import UnsupportedEncodingError
from ..sources import TensorSource
from .base import FP8_NAMES, Detection, KeyEncoding, ScaledWeight, check_scale

FORMAT = "diffusers_fp8"
SCALE = ".weight_scale"
INPUT_SCALE = ".input_scale"


def detect(source: TensorSource, claimed: set[str]) -> Detection:
    found = Detection()
    keys = set(source.keys())
    for sk in source.keys():
        if not sk.endswith(SCALE):
            continue
        layer = sk[: -len(SCALE)]
        wk, ik = layer + ".weight", layer + INPUT_SCALE
        if wk in claimed or wk not in keys:
            continue
        info = source.info(wk)
        if not info.dtype.is_floating_point:
            raise UnsupportedEncodingError(
                f"{source.name}: layer {layer!r} is stored as {str(info.dtype).replace('torch.', '')} with a "
                "weight_scale (an integer quantization whose zero points and grouping the file does not name); "
                "this pack cannot decode it exactly: use a bf16 or fp8 version of the model")
        if info.dtype not in FP8_NAMES:
            continue
        how = check_scale(source, layer, FORMAT, wk, sk)
        side = {"input_scale": ik} if ik in keys else {}
        enc = KeyEncoding(FORMAT, info.dtype, info.shape, side, source.info(sk).shape)
        found.recipes[wk] = ScaledWeight(enc, wk, sk, how)
        found.hidden.update(k for k in (sk, ik) if k in keys)
    return found
