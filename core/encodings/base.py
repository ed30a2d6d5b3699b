"""What an encoded tensor is, how one is decoded, and the decoded view of a file.

A quantized file stores some weights as a low-precision payload plus scale tensors. `DecodedSource`
shows such a file as the plain model it stands for: every encoded weight under its own key, decoded to
fp32 in its logical shape when read; the scale tensors, markers and activation scales are not keys of
the view at all (so no capability can merge a scale as if it were a weight). What a faithful re-encode
needs besides the values is in `KeyEncoding` (the stored dtype/shape, and `side`: the raw keys of tensors
such as activation scales that must be carried over).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dtypes import dtype_name
from ..errors import UnsupportedEncodingError
from ..safetensors_io import TensorInfo
from ..sources import TensorSource
from .fp8 import decode_fp8, decode_fp8_moved, fast_decodable, fold_shift

FP8_NAMES = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e5m2: "e5m2"}


def _stored_kind(dtype: torch.dtype) -> str:
    return FP8_NAMES.get(dtype) or dtype_name(dtype)


# format family (the part of `KeyEncoding.format` before ':') -> human label; other encodings (gguf)
# register theirs with `register_label`.
_LABELS: dict[str, Callable[[KeyEncoding], str]] = {
    "fp8_scaled": lambda e: f"fp8 scaled (legacy) {_stored_kind(e.stored_dtype)}",
    "comfy_quant": lambda e: f"comfy mixed precision {e.format.partition(':')[2]}",
    "diffusers_fp8": lambda e: f"fp8 + weight_scale (diffusers) {_stored_kind(e.stored_dtype)}",
    "gguf": lambda e: f"gguf {e.format.partition(':')[2]}",
}


def register_label(family: str, label: Callable[[KeyEncoding], str]) -> None:
    _LABELS[family] = label


@dataclass(frozen=True)
class KeyEncoding:
    """How one logical tensor is stored. `format`: a stable id ("fp8_scaled", "comfy_quant:float8_e4m3fn",
    "diffusers_fp8", "gguf:Q8_0"); `stored_dtype`/`stored_shape`: the payload as it sits in the file;
    `side`: role -> raw key of tensors that are not weights but belong to the layer and must be kept for a
    faithful re-encode (activation scale "input_scale", the legacy "marker", a per-layer "comfy_quant"
    config); `scale_shape`: the shape of the weight scale the file used ([] per tensor, [out, 1] per row,
    [out, in/block, 1] per block; None where the format has none). The weight scale itself is not in
    `side`: it is recomputed whenever the values change."""

    format: str
    stored_dtype: torch.dtype
    stored_shape: tuple[int, ...]
    side: Mapping[str, str] = field(default_factory=dict, hash=False)
    scale_shape: tuple[int, ...] | None = None

    @property
    def family(self) -> str:
        return self.format.partition(":")[0]

    @property
    def label(self) -> str:
        make = _LABELS.get(self.family)
        return make(self) if make else self.format


def plain_label(dtype: torch.dtype) -> str:
    return f"plain {dtype_name(dtype)}"


# --- scales -----------------------------------------------------------------------------------------


def scale_broadcast(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> str | None:
    """How a weight scale of `scale_shape` applies to a payload of `weight_shape`: "tensor" (one value:
    [], [1], [1, 1]), "row" (one per output row: [out], [out, 1, …]), "block" (2-D weights, one per row and
    block of `in / nb` columns: [out, nb, 1] or [out, nb]); None when it fits none of these."""
    n = 1
    for d in scale_shape:
        n *= d
    if n == 1:
        return "tensor"
    if not weight_shape:
        return None
    out = weight_shape[0]
    if scale_shape[0] == out and all(d == 1 for d in scale_shape[1:]) and len(scale_shape) <= max(len(weight_shape), 1):
        return "row"
    if len(weight_shape) == 2 and len(scale_shape) in (2, 3) and scale_shape[0] == out:
        nb = scale_shape[1]
        if (len(scale_shape) == 2 or scale_shape[2] == 1) and nb > 0 and weight_shape[1] % nb == 0:
            return "block"
    return None


def apply_scale(w: torch.Tensor, s: torch.Tensor, how: str) -> torch.Tensor:
    """fp32 `w` times the scale `s` broadcast as `scale_broadcast` decided (in place on `w`)."""
    s = s.to(torch.float32)
    if how == "tensor":
        return w.mul_(s.reshape(()))
    if how == "row":
        return w.mul_(s.reshape((w.shape[0],) + (1,) * (w.ndim - 1)))
    out, cols = w.shape
    nb = s.shape[1]
    return w.view(out, nb, cols // nb).mul_(s.reshape(out, nb, 1)).view(out, cols)


@dataclass(frozen=True)
class ScaledWeight:
    """A logical weight stored as `weight_key` (any dtype) times the scale `scale_key`: W = w.float() · s,
    exactly what ComfyUI computes in fp32 (`weight.to(float32) * scale_weight`)."""

    encoding: KeyEncoding
    weight_key: str
    scale_key: str | None  # None: the layer has no weight scale (scale 1)
    broadcast: str  # scale_broadcast's answer, "none" without a scale

    @property
    def logical_shape(self) -> tuple[int, ...]:
        return self.encoding.stored_shape

    def decode(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        q = read(self.weight_key)
        if fast_decodable(q):  # fp8 on the CPU: same bits, several times faster (fp8.py)
            return self._decode_fp8(q, None if self.scale_key is None else read(self.scale_key))
        w = q.to(torch.float32, copy=True)
        if self.scale_key is None:
            return w
        return apply_scale(w, read(self.scale_key), self.broadcast)

    def _decode_fp8(self, q: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        if s is None or self.broadcast == "tensor":
            return decode_fp8(q, s)
        w, shift = decode_fp8_moved(q)  # exact values, e4m3 ones / 2^k: the scale's multiply is the rounding
        if q.dtype != torch.float8_e4m3fn:
            return apply_scale(w, s, self.broadcast)
        folded, then = fold_shift(s, shift)
        if then is not None:  # 2^k · s overflows: two multiplies, the first exact
            return apply_scale(w.mul_(folded), then, self.broadcast)
        return apply_scale(w, folded, self.broadcast)


def check_scale(source: TensorSource, layer: str, fmt: str, weight_key: str, scale_key: str) -> str:
    """The broadcast of a layer's scale, or a refusal naming file, layer, format and the shapes."""
    ws, ss = source.info(weight_key).shape, source.info(scale_key).shape
    how = scale_broadcast(ws, ss)
    if how is None:
        raise UnsupportedEncodingError(
            f"{source.name}: layer {layer!r} ({fmt}): weight scale {scale_key!r} has shape {list(ss)}, which "
            f"does not apply to the weight's shape {list(ws)} per tensor, per row or per block; the file uses a "
            "scale layout this pack cannot decode exactly: convert it to bf16 with the tool that wrote it")
    if not source.info(scale_key).dtype.is_floating_point:
        raise UnsupportedEncodingError(
            f"{source.name}: layer {layer!r} ({fmt}): weight scale {scale_key!r} is "
            f"{dtype_name(source.info(scale_key).dtype)}, not a float; this pack cannot decode it: convert the file "
            "to bf16 with the tool that wrote it")
    return how


# --- the decoded view -------------------------------------------------------------------------------


@dataclass
class Detection:
    """What one encoding found in a file: logical key -> how to decode it, and raw keys to hide."""

    recipes: dict[str, ScaledWeight] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.recipes or self.hidden)


QUANT_METADATA_KEYS = ("_quantization_metadata",)


class DecodedSource(TensorSource):
    """`raw` as the plain model it encodes: encoded weights decode to fp32 in their logical shape on read,
    plain keys pass through in their stored dtype, scale/marker/activation-scale tensors are not keys (read
    them with `side_tensor`). NaN/Inf checks apply to the decoded values. The view's metadata leaves out
    the quantization layout (`_quantization_metadata`), which describes the raw file, not the values; the
    raw file's is `raw.metadata`."""

    def __init__(self, raw: TensorSource, detection: Detection):
        super().__init__()
        self.raw = raw
        self.name = raw.name
        self.metadata = {k: v for k, v in raw.metadata.items() if k not in QUANT_METADATA_KEYS}
        self.notes = raw.notes  # how the raw file was read (a checkpoint container), shared
        self._recipes = dict(detection.recipes)
        hidden = detection.hidden
        for k in raw.keys():
            if k in hidden:
                continue
            r = self._recipes.get(k)
            self._infos[k] = TensorInfo(r.logical_shape, torch.float32) if r else raw.info(k)
        # the checks run once, on decoded values: the raw payloads are never checked on their own
        raw.set_nonfinite_policy("ignore")

    def _load(self, key: str) -> torch.Tensor:
        r = self._recipes.get(key)
        return r.decode(self.raw._load) if r is not None else self.raw._load(key)

    def prefetch(self, key: str) -> None:
        r = self._recipes.get(key)  # an encoded key's payload (its scales are a few bytes)
        self.raw.prefetch(getattr(r, "weight_key", key) if r is not None else key)

    def encoding(self, key: str) -> KeyEncoding | None:
        self.info(key)
        r = self._recipes.get(key)
        return r.encoding if r is not None else None

    def side_tensor(self, raw_key: str) -> torch.Tensor:
        return self.raw.get(raw_key)

    def paths(self) -> list[Path]:
        return self.raw.paths()

    def close(self) -> None:
        self.raw.close()

    def __getattr__(self, name: str):  # attributes of particular raw sources (e.g. `skipped`)
        if name == "raw":
            raise AttributeError(name)
        return getattr(self.raw, name)
