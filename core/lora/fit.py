"""Does a LoRA fit a model? Each module's shapes against the model's weights, before anything is patched.

ComfyUI's loader only logs a shape mismatch ("WARNING SHAPE MISMATCH … WEIGHT NOT MERGED", or an error from
the reshape) and patches nothing for that layer, so a LoRA made for another width "applies" while changing
nothing. What ComfyUI accepts is mirrored here: low-rank factors are multiplied out and reshaped to the
weight (so the product must have the weight's rows and as many elements per row), a row-sliced term must
fall inside the weight's rows, and full diffs, bias diffs and replacements must have the exact shape. A
`reshape_weight` entry (BFL control LoRAs widen `img_in`) is the shape ComfyUI pads the weight to first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from ..errors import MismatchError
from . import keymaps
from .formats_base import RESHAPE_META
from .model import LoRA, ModuleDelta

Shape = tuple[int, ...]


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _term_misfit(term, weight: Shape) -> str | None:
    rows = int(term.up.shape[0])
    cols = math.prod(int(d) for d in term.down.shape[1:])
    want_cols = math.prod(weight[1:]) if len(weight) > 1 else 1
    if term.rows is None:
        if rows != weight[0] or cols != want_cols:
            return f"LoRA {_fmt((rows, *term.down.shape[1:]))}, model {_fmt(weight)}"
        return None
    start, length = term.rows
    if start + length > weight[0] or cols != want_cols:
        return f"LoRA rows {start}:{start + length} of {_fmt(('…', *term.down.shape[1:]))}, model {_fmt(weight)}"
    return None


def module_misfit(name: str, mod: ModuleDelta, shapes: Mapping[str, Shape], reshape: Mapping[str, list[int]]) -> str | None:
    """Why `mod` does not fit the model whose weight shapes are `shapes` (keys without `diffusion_model.`);
    None when it fits or when the model has no such layer (ComfyUI reports that itself: "lora key not loaded")."""
    wkey, bkey = keymaps.weight_key(name), keymaps.bias_key(name)
    weight = tuple(reshape[name]) if name in reshape else shapes.get(wkey)
    bias = shapes.get(bkey)
    if weight is not None:
        for t in mod.terms:
            if why := _term_misfit(t, weight):
                return why
        for role, v in (("diff", mod.diff), ("replacement", mod.set_weight)):
            if v is not None and tuple(v.shape) != weight:
                return f"LoRA {role} {_fmt(v.shape)}, model {_fmt(weight)}"
    if mod.diff_b is not None and bias is not None and tuple(mod.diff_b.shape) != bias:
        return f"LoRA bias change {_fmt(mod.diff_b.shape)}, model bias {_fmt(bias)}"
    return None


def check_lora_fits(lora: LoRA, shapes: Mapping[str, Shape], model: str = "this model") -> None:
    """Refuse (MismatchError naming every module and both shapes) a LoRA some of whose diffusion-model modules
    do not fit the model; `shapes`: model weight key (no `diffusion_model.` prefix) -> shape."""
    reshape = json.loads(lora.metadata.get(RESHAPE_META, "{}"))
    bad = []
    for name in sorted(lora.modules):
        if name.startswith(keymaps.DIFFUSION) and (why := module_misfit(name, lora.modules[name], shapes, reshape)):
            bad.append(f"{name[len(keymaps.DIFFUSION):]} ({why})")
    if bad:
        shown = "; ".join(bad[:8]) + (f"; … ({len(bad)} in all)" if len(bad) > 8 else "")
        raise MismatchError(
            f"{len(bad)} module(s) of this {lora.arch} LoRA do not fit {model}: {shown}. The LoRA was made for a "
            "model of another size or variant; ComfyUI would patch none of these layers. Use a LoRA trained for "
            "this model")


__all__ = ["check_lora_fits", "module_misfit"]
