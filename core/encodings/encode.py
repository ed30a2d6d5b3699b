"""Writing quantized outputs: ComfyUI scaled fp8 (legacy) and mixed precision, from fp32 results.

What ComfyUI 0.3.75 reads (comfy/model_detection.py, comfy/ops.py, comfy/quant_ops.py):

* legacy scaled fp8: a marker tensor `<diffusion prefix>scaled_fp8` whose dtype is the fp8 kind; every
  Linear of the diffusion model is then built in that dtype and holds `<layer>.weight` (fp8) and
  `<layer>.scale_weight` (fp32, shape []), optionally `<layer>.scale_input`. A marker of 2 elements turns
  ComfyUI's fp8 matrix multiplication off (no activation scales are then loaded); an empty one turns it on.
* mixed precision: file metadata `_quantization_metadata` = {"format_version": "1.0", "layers": {layer:
  {"format": "float8_e4m3fn"}}} (layer names relative to the diffusion model), `<layer>.weight` (fp8) and
  `<layer>.weight_scale` (fp32 scalar), optionally `<layer>.input_scale`. Layers not listed load as plain.
  0.3.75 itself defines only float8_e4m3fn; float8_e5m2 is written for later ComfyUI versions.

Scales are always computed from the tensor being written (amax / the fp8 kind's largest finite value; an
all-zero tensor gets scale 1), never merged: the merged weights decode as q.float() * scale within half
an fp8 step. Activation scales are not weights: they are copied from the input the key's encoding came
from. An encoding that cannot be written back (GGUF, int8, mxfp8, nvfp4, diffusers fp8) stops `keep` with
an error naming the key and what to choose instead.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

import torch

from ..dtypes import MODEL_OUTPUT_CHOICES, dtype_name, parse_dtype
from ..errors import WeightsmithError
from ..sources import detect_diffusion_prefix
from . import fp8_native
from .base import KeyEncoding
from .fp8 import decode_fp8, fast_decodable

FP8_MAX: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
QUANT_METADATA_KEY = "_quantization_metadata"


# ---------------------------------------------------------------------------------------------------
# Pure tensor functions


def fp8_scale(amax: float, fp8: torch.dtype) -> torch.Tensor:
    """The fp32 scalar scale that maps |w| <= amax onto the fp8 kind's range (1 for an all-zero tensor)."""
    if not amax > 0:
        return torch.tensor(1.0, dtype=torch.float32)
    return torch.tensor(amax, dtype=torch.float32) / FP8_MAX[fp8]


def finite_amax(t: torch.Tensor) -> float:
    """max |t| over its finite values (0 for an empty or all-non-finite tensor)."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)  # measured ~8x faster than abs().amax(), which writes |t| first
    m = max(-float(lo), float(hi))
    if m == m and m != float("inf"):
        return m
    finite = t[torch.isfinite(t)]
    return float(finite.abs().amax()) if finite.numel() else 0.0


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor, fp8: torch.dtype, out: torch.Tensor | None = None,
                 saturate: bool = True, inplace: bool = False) -> torch.Tensor:
    """fp8 payload of `w` (any float dtype) for `scale`: w / scale rounded to nearest, saturated at the
    kind's range (NaN stays NaN). Divides in fp32, so the decoded value q * scale is w within half a step.
    `saturate=False` when every value is finite and `scale` came from their amax (w / scale is then in range
    up to one fp32 rounding, which the cast rounds back); `inplace` divides an fp32 `w` in place."""
    if native_quantizable(w, scale, fp8, out):  # one pass, same bits (fp8_native.c)
        if out is None:
            out = torch.empty(w.shape, dtype=fp8)
        fp8_native.quantize_e4m3(w, out, float(scale), saturate)
        return out
    y = w.div_(scale) if inplace and w.dtype == torch.float32 else w.float() / scale
    if saturate:
        m = FP8_MAX[fp8]
        y.clamp_(-m, m)
    if out is None:
        return y.to(fp8)
    return out.copy_(y)


def native_quantizable(w: torch.Tensor, scale: torch.Tensor, fp8: torch.dtype, out: torch.Tensor | None) -> bool:
    """Whether quantize_fp8 can take the native kernel: e4m3fn from contiguous fp32 on the CPU, one
    scale, and the kernels built."""
    return (fp8 == torch.float8_e4m3fn and w.dtype == torch.float32 and w.device.type == "cpu"
            and w.is_contiguous() and scale.numel() == 1
            and (out is None or (out.is_contiguous() and out.numel() == w.numel() and out.dtype == fp8))
            and fp8_native.library() is not None)


class ScaledRows:
    """A tensor-wise scaled fp8 weight read by rows without decoding it whole: `rows[a:b]` is
    payload[a:b].float() * scale, the value a decoded source returns (one fp32 multiply)."""

    def __init__(self, payload: torch.Tensor, scale: torch.Tensor):
        self.payload = payload
        self.scale = scale.float().reshape(())
        self.shape = payload.shape
        self.dtype = torch.float32
        self._factors: dict = {}  # decode_fp8's folded factors for this scale, made once

    def __getitem__(self, rows) -> torch.Tensor:
        q = self.payload[rows]
        if fast_decodable(q):
            return decode_fp8(q, self.scale, factors=self._factors)
        return q.float().mul_(self.scale)

    def rows(self, r0: int, r1: int, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [r0, r1) decoded on `device`: only the fp8 bytes travel (a quarter of fp32's). `out`: a
        contiguous fp32 CPU buffer of at least that many elements to decode into (a worker's reused
        buffer: a fresh one costs more in page faults than the decoding); the result is a view of it."""
        q = self.payload[r0:r1]
        if torch.device(device).type == "cpu" and fast_decodable(q):
            if out is not None:
                out = out.view(-1)[: q.numel()].view(q.shape)
            return decode_fp8(q, self.scale, out=out, factors=self._factors)
        y = q.to(device).float().mul_(self.scale.to(device))
        return y if out is None or out.device != y.device else out.view(-1)[: y.numel()].view(y.shape).copy_(y)

    def to(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return self[:].to(device, dtype)


_SCALE_SUFFIX = {"fp8_scaled": "scale_weight", "comfy_quant:float8_e4m3fn": "weight_scale",
                 "comfy_quant:float8_e5m2": "weight_scale"}


def scaled_rows(source, raw_key: str) -> ScaledRows | None:
    """Row access to a key stored as fp8 with one scalar scale, when the source hands out its stored
    payload and scale by raw key (`side_tensor`); None otherwise (the caller then reads the decoded tensor)."""
    enc = source_encoding(source, raw_key)
    if enc is None or enc.format not in _SCALE_SUFFIX or not raw_key.endswith(".weight"):
        return None
    scale_key = enc.side.get("weight_scale") or f"{raw_key[: -len('.weight')]}.{_SCALE_SUFFIX[enc.format]}"
    try:
        payload, scale = source.side_tensor(raw_key), source.side_tensor(scale_key)
    except (KeyError, ValueError, LookupError):
        return None
    if payload.dtype != enc.stored_dtype or tuple(payload.shape) != tuple(source.info(raw_key).shape) \
            or scale.numel() != 1 or not scale.is_floating_point():
        return None
    return ScaledRows(payload, scale)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W = q.float() * scale, the way ComfyUI dequantizes both layouts."""
    if fast_decodable(q) and scale.numel() == 1:
        return decode_fp8(q, scale.float()).reshape(torch.broadcast_shapes(q.shape, scale.shape))
    return q.float() * scale.float()


# ---------------------------------------------------------------------------------------------------
# Output formats and the user's choice


@dataclass(frozen=True)
class OutputFormat:
    """How an encoded weight and its side tensors are named and stored."""

    format: str  # "fp8_scaled" | "comfy_quant:float8_e4m3fn" | "comfy_quant:float8_e5m2"
    fp8: torch.dtype
    scale_suffix: str  # weight scale: `<layer>.<scale_suffix>`
    input_scale_suffix: str  # activation scale, copied from the input

    @property
    def legacy(self) -> bool:
        return self.format == "fp8_scaled"

    @property
    def label(self) -> str:
        return f"{self.format} ({dtype_name(self.fp8)})" if self.legacy else self.format


FP8_SCALED_E4M3 = OutputFormat("fp8_scaled", torch.float8_e4m3fn, "scale_weight", "scale_input")
FP8_SCALED_E5M2 = OutputFormat("fp8_scaled", torch.float8_e5m2, "scale_weight", "scale_input")
MIXED_E4M3 = OutputFormat("comfy_quant:float8_e4m3fn", torch.float8_e4m3fn, "weight_scale", "input_scale")
MIXED_E5M2 = OutputFormat("comfy_quant:float8_e5m2", torch.float8_e5m2, "weight_scale", "input_scale")

# An input encoding `keep` can write back: (format, stored dtype) -> how
WRITABLE: dict[tuple[str, torch.dtype], OutputFormat] = {
    ("fp8_scaled", torch.float8_e4m3fn): FP8_SCALED_E4M3,
    ("fp8_scaled", torch.float8_e5m2): FP8_SCALED_E5M2,
    ("comfy_quant:float8_e4m3fn", torch.float8_e4m3fn): MIXED_E4M3,
    ("comfy_quant:float8_e5m2", torch.float8_e5m2): MIXED_E5M2,
}
# Explicit encodings the user can ask for by name
ENCODED_CHOICES: dict[str, OutputFormat] = {"fp8_scaled": FP8_SCALED_E4M3, "fp8_scaled_e5m2": FP8_SCALED_E5M2}


@dataclass(frozen=True)
class OutputChoice:
    """The output dtype a user picked: `keep` (each key as the input its value comes from stores it), a
    plain dtype for every float tensor, or an encoding for the weights that can take it."""

    name: str
    dtype: torch.dtype | None = None
    encode: OutputFormat | None = None

    @property
    def keep(self) -> bool:
        return self.dtype is None and self.encode is None


def parse_output(choice: str | torch.dtype | OutputChoice | None) -> OutputChoice:
    """'keep' / None -> keep; 'bf16' (or a torch dtype) -> plain; 'fp8_scaled[_e5m2]' -> encoded."""
    if isinstance(choice, OutputChoice):
        return choice
    if isinstance(choice, torch.dtype):
        return OutputChoice(dtype_name(choice), dtype=choice)
    name = (choice or "keep").strip().lower()
    if name in ENCODED_CHOICES:
        return OutputChoice(name, encode=ENCODED_CHOICES[name])
    try:
        dtype = parse_dtype(name)
    except ValueError:
        raise WeightsmithError(f"unknown output dtype {choice!r}; choose one of {', '.join(MODEL_OUTPUT_CHOICES)}") from None
    return OutputChoice("keep" if dtype is None else name, dtype=dtype)


# Weights ComfyUI does not build as Linear layers (scaled fp8 only replaces Linear): left unquantized
_EMBEDDING = re.compile(r"(?:^|\.)(?:[a-z_]*embedding|embed_tokens|wte|wpe)\.weight$")


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether an explicit fp8_scaled output quantizes this diffusion-model key: the 2-D weight of a
    Linear layer (biases, norms, convolutions and embeddings stay in their dtype, as in ComfyUI's own
    scaled-fp8 files, whose loader turns only Linear layers into fp8)."""
    return name.endswith(".weight") and len(shape) == 2 and not _EMBEDDING.search(name)


# ---------------------------------------------------------------------------------------------------
# One output file's layout


@dataclass
class KeyOutput:
    """How one logical key is written: plain in `dtype`, or encoded by `fmt` (payload dtype `dtype`)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fmt: OutputFormat | None = None
    layer: str = ""  # the layer name relative to the diffusion model (encoded keys)
    scale_key: str = ""
    input_scale: tuple[object, str] | None = None  # (source, raw key) of an activation scale to copy
    input_scale_key: str = ""


def source_encoding(source, raw_key: str) -> KeyEncoding | None:
    """The encoding a source reports for a key (None: plain, or a source that decodes nothing)."""
    fn = getattr(source, "encoding", None)
    return fn(raw_key) if fn is not None else None


def _source_marker(source, raw_key: str, enc: KeyEncoding) -> torch.Tensor | None:
    """The input's own scaled_fp8 marker (its `side["marker"]`, else beside the key's diffusion prefix),
    when the source hands out hidden tensors by raw key; None when it cannot."""
    fn = getattr(source, "side_tensor", None)
    if fn is None:
        return None
    try:
        return fn(enc.side.get("marker") or detect_diffusion_prefix([raw_key]) + "scaled_fp8")
    except (KeyError, ValueError, LookupError):
        return None


class OutputLayout:
    """Every tensor of one output file: logical keys (plain or encoded), the scales and copied activation
    scales beside encoded ones, the scaled_fp8 marker; and the metadata the encodings need."""

    def __init__(self, choice: str | torch.dtype | OutputChoice | None, diffusion_prefix: str = ""):
        self.choice = parse_output(choice)
        self.prefix = diffusion_prefix
        self.keys: dict[str, KeyOutput] = {}
        self._marker_dtypes: dict[torch.dtype, str] = {}  # fp8 kind -> first key needing it
        self._marker_numel: int | None = None
        self._formats: Counter[str] = Counter()

    def add(self, key: str, shape: tuple[int, ...], plain: torch.dtype, name: str | None,
            enc: KeyEncoding | None, source=None, raw_key: str = "", where: str = "") -> KeyOutput:
        """Decide how `key` is written. `plain`: the dtype the caller writes it in when not encoded;
        `name`: the key relative to the diffusion model (None outside it); `enc`: the encoding of the
        input the key's value comes from (its `source` / `raw_key`, named `where` in messages)."""
        fmt = self._format(key, shape, plain, name, enc, where)
        if fmt is None:
            if enc is not None and plain == torch.float32 and self.choice.encode is not None:
                plain = torch.bfloat16  # a decoded weight left unquantized: as ComfyUI's own files keep them
            ko = KeyOutput(key, shape, plain)
        else:
            assert name is not None
            layer = key[: -len(".weight")]
            ko = KeyOutput(key, shape, fmt.fp8, fmt, name[: -len(".weight")], f"{layer}.{fmt.scale_suffix}")
            side = (enc.side if enc is not None else {}).get("input_scale")
            if side:
                ko.input_scale, ko.input_scale_key = (source, side), f"{layer}.{fmt.input_scale_suffix}"
            if fmt.legacy:
                self._marker_dtypes.setdefault(fmt.fp8, key)
                if self._marker_numel is None and enc is not None and enc.format == "fp8_scaled":
                    marker = _source_marker(source, raw_key, enc)
                    if marker is not None:
                        self._marker_numel = marker.numel()
            self._formats[fmt.format] += 1
        self.keys[key] = ko
        return ko

    def _format(self, key, shape, plain, name, enc, where) -> OutputFormat | None:
        c = self.choice
        if c.encode is not None:
            if name is not None and plain.is_floating_point and quantizable(name, shape):
                return c.encode
            return None
        if not c.keep or enc is None:
            return None
        fmt = WRITABLE.get((enc.format, enc.stored_dtype))
        src = f" in {where}" if where else ""
        if fmt is None:
            raise WeightsmithError(
                f"{key!r} is stored as {enc.format} ({dtype_name(enc.stored_dtype)}){src}; weightsmith cannot write "
                "that encoding back, so the output dtype 'keep' cannot keep it. Choose an output dtype: "
                "fp8_scaled (ComfyUI scaled fp8), bf16 or fp16. Nothing was written")
        if name is None or not key.endswith(".weight") or len(shape) != 2:
            raise WeightsmithError(
                f"{key!r}{src} is stored as {enc.format}, but weightsmith writes that encoding only for the 2-D "
                "weights of the diffusion model (it is outside it, or not a Linear weight). Choose an output "
                "dtype (bf16, or fp8_scaled for the diffusion model), or leave these keys out of the output. "
                "Nothing was written")
        return fmt

    def check(self) -> None:
        """Refuse layouts ComfyUI would load wrongly: legacy scaled fp8 and mixed precision in one file
        (ComfyUI then ignores every scale_weight), or two fp8 kinds under one scaled_fp8 marker."""
        legacy = self._formats.get("fp8_scaled", 0)
        mixed = sum(n for f, n in self._formats.items() if f.startswith("comfy_quant:"))
        if legacy and mixed:
            raise WeightsmithError(
                f"the output would hold {legacy} ComfyUI scaled-fp8 weights and {mixed} mixed-precision ones "
                "(the inputs are encoded differently); ComfyUI cannot load both in one file. Choose one output "
                "encoding explicitly (fp8_scaled) or a plain dtype (bf16). Nothing was written")
        if len(self._marker_dtypes) > 1:
            detail = ", ".join(f"{dtype_name(d)} (e.g. {k!r})" for d, k in self._marker_dtypes.items())
            raise WeightsmithError(
                f"the output would hold scaled-fp8 weights of two fp8 kinds ({detail}); ComfyUI's scaled_fp8 "
                "marker names one kind per file. Choose fp8_scaled or fp8_scaled_e5m2 explicitly. Nothing was "
                "written")
        for ko in self.keys.values():
            for extra in (ko.scale_key, ko.input_scale_key):
                if extra and extra in self.keys:
                    raise WeightsmithError(f"the output key {extra!r} is both a tensor of the inputs and the scale "
                                           f"of {ko.key!r}; drop it with a rule. Nothing was written")

    @property
    def marker_key(self) -> str | None:
        return f"{self.prefix}scaled_fp8" if self._marker_dtypes else None

    def marker(self) -> torch.Tensor | None:
        """ComfyUI's scaled_fp8 marker: the input's own element count where known; else empty (fp8
        matmul on, as ComfyUI saves it) when activation scales are written, 2 elements (off: no
        activation scale of 1 clamping inputs to the fp8 range) when none are."""
        if not self._marker_dtypes:
            return None
        dtype = next(iter(self._marker_dtypes))
        n = self._marker_numel
        if n is None:
            n = 0 if any(k.input_scale for k in self.keys.values() if k.fmt is not None and k.fmt.legacy) else 2
        return torch.zeros(n, dtype=dtype)

    def writer_plan(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """key -> (shape, dtype) of every tensor written, for the StreamingWriter."""
        self.check()
        plan: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for ko in self.keys.values():
            plan[ko.key] = (ko.shape, ko.dtype)
            if ko.fmt is not None:
                plan[ko.scale_key] = ((), torch.float32)
                if ko.input_scale is not None:
                    src, raw = ko.input_scale
                    t = src.side_tensor(raw)
                    plan[ko.input_scale_key] = (tuple(t.shape), t.dtype)
        marker = self.marker()
        if marker is not None:
            plan[self.marker_key] = (tuple(marker.shape), marker.dtype)
        return plan

    def metadata(self, base: dict[str, str] | None) -> dict[str, str]:
        """The output's metadata: `base` without any inherited quantization metadata, plus the one that
        lists exactly the mixed-precision layers written."""
        meta = {k: v for k, v in (base or {}).items() if k != QUANT_METADATA_KEY}
        layers = {ko.layer: {"format": ko.fmt.format.split(":", 1)[1]} for ko in self.keys.values()
                  if ko.fmt is not None and not ko.fmt.legacy}
        if layers:
            meta[QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": layers})
        return meta

    def write_extras(self, writer) -> None:
        """The marker and the copied activation scales (small; written once, before the weights)."""
        marker = self.marker()
        if marker is not None:
            writer.write(self.marker_key, marker)
        for ko in self.keys.values():
            if ko.fmt is not None and ko.input_scale is not None:
                src, raw = ko.input_scale
                writer.write(ko.input_scale_key, src.side_tensor(raw).contiguous())

    def summary(self) -> dict[str, int]:
        """Written tensors per encoding (plain ones by dtype), for reports."""
        c: Counter[str] = Counter()
        for ko in self.keys.values():
            c[ko.fmt.label if ko.fmt is not None else dtype_name(ko.dtype)] += 1
        return dict(c)

    @property
    def encoded(self) -> bool:
        return any(ko.fmt is not None for ko in self.keys.values())


def write_encoded(writer, ko: KeyOutput, y: torch.Tensor, amax: float | None = None) -> None:
    """Quantize a whole fp32 result `y` for `ko` and write its payload and scale."""
    assert ko.fmt is not None
    scale = fp8_scale(finite_amax(y) if amax is None else amax, ko.fmt.fp8)
    writer.write(ko.key, quantize_fp8(y, scale, ko.fmt.fp8).reshape(ko.shape))
    writer.write(ko.scale_key, scale)
