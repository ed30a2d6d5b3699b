"""Quantized versions of the small test models, in the layouts real writers use (for tests and demos).

Each encoder takes a plain state dict and returns `Encoded`: the tensors and metadata to write, and the
exact dequantized weights computed here, at generation time, with plain broadcasting of its own (not
with the decoder under test): `dequantized` is the truth a decoder must reproduce bit for bit.

* `scaled_fp8`: ComfyUI legacy, e4m3fn or e5m2, scale per tensor ([] as ComfyUI writes it, or [1]), per
  row ([out, 1]) or per block ([out, in/block, 1]), optionally with `scale_input`, marker optional.
* `mixed_precision`: ComfyUI mixed precision, the 0.3.75 metadata form or the `comfy_quant` tensor form.
* `diffusers_fp8`: `weight_scale` (+ `input_scale`) with no ComfyUI config.
Only 2-D `.weight` tensors (Linear layers) are quantized, as ComfyUI's fp8 ops do; the rest stay plain.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

SCALE_KINDS = ("tensor", "one", "row", "block")


@dataclass
class Encoded:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    dequantized: dict[str, torch.Tensor] = field(default_factory=dict)  # logical key -> exact fp32 value
    layers: list[str] = field(default_factory=list)  # the quantized logical weight keys

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata=self.metadata or None)
        return Path(path)

    def plain(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The model these tensors stand for: dequantized weights (fp32, or `dtype`) and the plain keys as stored."""
        out = {}
        for k, v in self.tensors.items():
            if k in self.dequantized:
                out[k] = self.dequantized[k] if dtype is None else self.dequantized[k].to(dtype)
            elif k in _hidden_keys(self):
                continue
            else:
                out[k] = v
        return out


def _hidden_keys(e: Encoded) -> set[str]:
    return {k for k in e.tensors if k not in e.dequantized and _is_side(k)}


_SIDE_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant")


def _is_side(k: str) -> bool:
    return k.endswith(_SIDE_SUFFIXES) or k == "scaled_fp8" or k.endswith(".scaled_fp8")


def quantizable(key: str, t: torch.Tensor) -> bool:
    return key.endswith(".weight") and t.ndim == 2 and t.is_floating_point()


def _scale_for(w: torch.Tensor, kind: str, fmax: float, block: int) -> torch.Tensor:
    a = w.abs()
    if kind == "tensor":
        s = a.amax().reshape(())
    elif kind == "one":
        s = a.amax().reshape(1)
    elif kind == "row":
        s = a.amax(dim=1, keepdim=True)
    elif kind == "block":
        out, cols = w.shape
        s = a.reshape(out, cols // block, block).amax(dim=2, keepdim=True)
    else:
        raise ValueError(f"scale kind {kind!r}: choose one of {SCALE_KINDS}")
    return (s.float() / fmax).clamp_min(1e-12)


def _expand(s: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The scale repeated to one value per weight element (repeat, not broadcasting rules)."""
    out, cols = shape
    if s.numel() == 1:
        return s.reshape(1, 1).repeat(out, cols)
    if s.ndim == 3:  # [out, nb, 1]
        return s.reshape(out, -1).repeat_interleave(cols // s.shape[1], dim=1)
    return s.reshape(out, 1).repeat(1, cols)


def quantize(w: torch.Tensor, dtype: torch.dtype, kind: str = "tensor", block: int = 16
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(payload, scale, exact dequantized fp32) of a 2-D weight, the scale chosen so amax maps to the
    format's max (e4m3fn 448, e5m2 57344)."""
    w = w.float()
    fmax = torch.finfo(dtype).max
    s = _scale_for(w, kind, fmax, block)
    full = _expand(s, tuple(w.shape))
    q = (w / full).clamp(-fmax, fmax).to(dtype)
    return q, s, q.float() * full


def _encode(sd: Mapping[str, torch.Tensor], names: Callable[[str], tuple[str, str]], dtype: torch.dtype,
            kind: str, block: int, select: Callable[[str], bool] | None, input_scale: bool,
            input_name: Callable[[str], str]) -> Encoded:
    enc = Encoded({})
    for k, t in sd.items():
        if quantizable(k, t) and (select is None or select(k)):
            q, s, deq = quantize(t, dtype, kind, block)
            wk, sk = names(k)
            enc.tensors[wk] = q
            enc.tensors[sk] = s
            if input_scale:
                enc.tensors[input_name(k)] = torch.tensor(0.5 + (len(k) % 7) / 10, dtype=torch.float32)
            enc.dequantized[wk] = deq
            enc.layers.append(wk)
        else:
            enc.tensors[k] = t
    return enc


def _layer(k: str) -> str:
    return k[: -len(".weight")]


def scaled_fp8(sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float8_e4m3fn, kind: str = "tensor",
               block: int = 16, input_scale: bool = False, marker: bool = True, prefix: str = "",
               select: Callable[[str], bool] | None = None) -> Encoded:
    """ComfyUI legacy scaled fp8 (keys of `sd` get `prefix`, the marker `<prefix>scaled_fp8`)."""
    enc = _encode({prefix + k: v for k, v in sd.items()}, lambda k: (k, _layer(k) + ".scale_weight"), dtype, kind,
                  block, select and (lambda k: select(k[len(prefix):])), input_scale,
                  lambda k: _layer(k) + ".scale_input")
    if marker:
        enc.tensors[prefix + "scaled_fp8"] = torch.empty(0, dtype=dtype)
    return enc


def mixed_precision(sd: Mapping[str, torch.Tensor], form: str = "metadata", fmt: str = "float8_e4m3fn",
                    input_scale: bool = False, prefix: str = "",
                    select: Callable[[str], bool] | None = None) -> Encoded:
    """ComfyUI mixed precision: `form` "metadata" (0.3.75's `_quantization_metadata`, layer names without
    `prefix`) or "tensor" (a `<layer>.comfy_quant` uint8 JSON tensor per layer)."""
    dtype = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}[fmt]
    enc = _encode({prefix + k: v for k, v in sd.items()}, lambda k: (k, _layer(k) + ".weight_scale"), dtype, "tensor",
                  16, select and (lambda k: select(k[len(prefix):])), input_scale,
                  lambda k: _layer(k) + ".input_scale")
    if form == "metadata":
        layers = {_layer(k)[len(prefix):]: {"format": fmt} for k in enc.layers}
        enc.metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    elif form == "tensor":
        for k in enc.layers:
            enc.tensors[_layer(k) + ".comfy_quant"] = config_tensor({"format": fmt})
    else:
        raise ValueError(f"form {form!r}: choose metadata or tensor")
    return enc


def config_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def diffusers_fp8(sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float8_e4m3fn, kind: str = "tensor",
                  input_scale: bool = True) -> Encoded:
    """fp8 weights with `<layer>.weight_scale` (+ `input_scale`) and no ComfyUI config."""
    return _encode(sd, lambda k: (k, _layer(k) + ".weight_scale"), dtype, kind, 16, None, input_scale,
                   lambda k: _layer(k) + ".input_scale")
