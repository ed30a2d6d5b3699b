"""Quantized test files and a minimal decoding source for the output-side tests and the benchmark.

`write_scaled_fp8` / `write_mixed` write what ComfyUI writes (legacy scaled fp8 with its marker, or
mixed precision with `_quantization_metadata`), quantized the way ComfyUI's TensorCoreFP8Layout does
(scale = amax / fp8 max). `DecodedSource` follows the decode side's contract (fp32 for encoded keys,
scales and markers hidden, `encoding()` / `side_tensor()`), reading the two layouts above only: it stands
in where the package's own decoding is not what a test is about.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from weightsmith.encodings.base import KeyEncoding
from weightsmith.safetensors_io import StreamingWriter, TensorInfo
from weightsmith.sources import SafetensorsSource, TensorSource, detect_diffusion_prefix

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def comfy_quantize(w: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(payload, scale) as ComfyUI's TensorCoreFP8Layout.quantize makes them (w * (1/scale), clamp, cast)."""
    scale = (w.float().abs().amax() / FP8_MAX[fp8]).to(torch.float32)
    if float(scale) == 0:
        scale = torch.tensor(1.0)
    q = (w.float() * (1.0 / scale)).clamp(-FP8_MAX[fp8], FP8_MAX[fp8]).to(fp8)
    return q, scale


def _quantized(key: str, t: torch.Tensor) -> bool:
    return key.endswith(".weight") and t.ndim == 2


def write_scaled_fp8(path, sd: dict[str, torch.Tensor], fp8: torch.dtype = torch.float8_e4m3fn, prefix: str = "",
                     input_scale: float | None = None, marker_numel: int = 2, rest: torch.dtype = torch.bfloat16,
                     which=_quantized) -> None:
    """A ComfyUI legacy scaled-fp8 file: every `which(key, t)` weight as fp8 + scale_weight, the rest in
    `rest`, the `scaled_fp8` marker (of `marker_numel` elements), optional scale_input per layer."""
    tensors: dict[str, torch.Tensor] = {f"{prefix}scaled_fp8": torch.zeros(marker_numel, dtype=fp8)}
    for k, t in sd.items():
        if which(k, t):
            q, s = comfy_quantize(t, fp8)
            layer = prefix + k[: -len(".weight")]
            tensors[prefix + k], tensors[f"{layer}.scale_weight"] = q, s
            if input_scale is not None:
                tensors[f"{layer}.scale_input"] = torch.tensor(input_scale, dtype=torch.float32)
        else:
            tensors[prefix + k] = t.to(rest)
    _write(path, tensors, {})


def write_mixed(path, sd: dict[str, torch.Tensor], fmt: str = "float8_e4m3fn", prefix: str = "",
                input_scale: float | None = None, rest: torch.dtype = torch.bfloat16, which=_quantized) -> None:
    """A ComfyUI 0.3.75 mixed-precision file: `_quantization_metadata` + weight_scale (+ input_scale)."""
    fp8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}[fmt]
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for k, t in sd.items():
        if which(k, t):
            q, s = comfy_quantize(t, fp8)
            layer = k[: -len(".weight")]
            layers[layer] = {"format": fmt}
            tensors[prefix + k], tensors[f"{prefix}{layer}.weight_scale"] = q, s
            if input_scale is not None:
                tensors[f"{prefix}{layer}.input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
        else:
            tensors[prefix + k] = t.to(rest)
    _write(path, tensors, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})})


def _write(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with StreamingWriter(path, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, metadata) as w:
        for k, t in tensors.items():
            w.write(k, t.contiguous())


def dequantized(path) -> dict[str, torch.Tensor]:
    """Every logical tensor of a (scaled-fp8, mixed or plain) file as fp32, decoded W = q * scale."""
    with DecodedSource(path) as s:
        return {k: s.get(k).float() for k in s.keys()}


class DecodedSource(TensorSource):
    """A safetensors file read as logical fp32 weights (legacy scaled fp8 and 0.3.75 mixed precision)."""

    def __init__(self, path):
        super().__init__()
        self.raw = SafetensorsSource([Path(path)])
        self.name = self.raw.name
        self.metadata = {k: v for k, v in self.raw.metadata.items() if k != "_quantization_metadata"}
        keys = self.raw.keys()
        prefix = detect_diffusion_prefix(keys)
        self._encodings: dict[str, KeyEncoding] = {}
        self._scale: dict[str, str] = {}
        hidden: set[str] = set()
        marker = f"{prefix}scaled_fp8"
        if marker in keys:
            hidden.add(marker)
            for k in keys:
                layer = k[: -len(".weight")]
                if k.endswith(".weight") and f"{layer}.scale_weight" in keys:
                    self._add(k, "fp8_scaled", f"{layer}.scale_weight", f"{layer}.scale_input", keys, hidden)
        quant = json.loads(self.raw.metadata.get("_quantization_metadata", "{}")).get("layers", {})
        for layer, conf in quant.items():
            full = f"{prefix}{layer}"
            self._add(f"{full}.weight", f"comfy_quant:{conf['format']}", f"{full}.weight_scale",
                      f"{full}.input_scale", keys, hidden)
        for k in keys:
            if k in hidden:
                continue
            info = self.raw.info(k)
            self._infos[k] = TensorInfo(info.shape, torch.float32) if k in self._encodings else info

    def _add(self, key, fmt, scale_key, input_key, keys, hidden) -> None:
        side = {"input_scale": input_key} if input_key in keys else {}
        info = self.raw.info(key)
        self._encodings[key] = KeyEncoding(fmt, info.dtype, info.shape, side)
        self._scale[key] = scale_key
        hidden.update([scale_key, *side.values()])

    def encoding(self, key: str) -> KeyEncoding | None:
        self.info(key)
        return self._encodings.get(key)

    def side_tensor(self, raw_key: str) -> torch.Tensor:
        return self.raw._load(raw_key)

    def _load(self, key: str) -> torch.Tensor:
        t = self.raw._load(key)
        if key in self._encodings:
            return t.float() * self.raw._load(self._scale[key]).float()
        return t

    def paths(self):
        return self.raw.paths()

    def close(self) -> None:
        self.raw.close()
