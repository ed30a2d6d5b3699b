"""GGUF files made by the `gguf` package itself, in ComfyUI-GGUF's layout, and ComfyUI-GGUF's own loader.

`write_reference_gguf` follows ComfyUI-GGUF's tools/convert.py step by step (GGUFWriter.add_tensor on
`gguf.quants.quantize` output; 1-D and small tensors F32; SD UNets reshaped to rows of 256 with
`comfy.gguf.orig_shape.*`; a row the type cannot hold falls back to F16), quantizing straight to the asked
type where ComfyUI-GGUF's pipeline would run llama-quantize on the F16 file. None of Weightsmith's code is
used, so reading these files tests our reader against an independent producer.

`comfyui_gguf_dir()` finds a copy of city96/ComfyUI-GGUF (COMFYUI_GGUF_PATH, or custom_nodes/ComfyUI-GGUF of
the ComfyUI the tests use); nothing of it is vendored, and the tests that import it skip without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

gguf = __import__("gguf")
T = gguf.GGMLQuantizationType


def write_reference_gguf(path: Path, sd: dict[str, torch.Tensor], qtype: str, arch: str,
                         shape_fix: bool = False) -> None:
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, t in sd.items():
        data = t.float().numpy()
        n = data.size
        q = T[qtype]
        if data.ndim == 1 or n <= 1024:
            q = T.F32
        if shape_fix and data.ndim > 1 and n >= 512 and n % 256 == 0 and data.shape[-1] % 256 != 0:
            w.add_array(f"comfy.gguf.orig_shape.{key}", tuple(int(d) for d in data.shape))
            data = data.reshape(n // 256, 256)
        try:
            data = gguf.quants.quantize(data, q)
        except (AttributeError, gguf.QuantError):
            q = T.F16
            data = gguf.quants.quantize(data, q)
        w.add_tensor(key, data, raw_dtype=q)
    w.write_header_to_file(path=Path(path))
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_values(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file decoded by the `gguf` package (fp32), in its torch shape."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        field = r.get_field(f"comfy.gguf.orig_shape.{t.name}")
        shape = tuple(int(field.parts[i][0]) for i in field.data) if field else tuple(reversed(t.shape.tolist()))
        out[t.name] = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    return out


def random_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random raw blocks of a GGML type whose fp16 scale fields hold finite values (random bytes elsewhere)."""
    block, size = gguf.GGML_QUANT_SIZES[T[qtype]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    halves = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "IQ4_NL": [0], "Q4_1": [0, 2], "Q5_1": [0, 2],
              "Q4_K": [0, 2], "Q5_K": [0, 2], "IQ4_XS": [0], "Q2_K": [size - 4, size - 2], "Q3_K": [size - 2],
              "Q6_K": [size - 2], "TQ2_0": [size - 2], "TQ1_0": [size - 2]}[qtype]
    for at in halves:
        scale = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16)
        raw[:, at:at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


def comfyui_gguf_dir() -> Path | None:
    from comfy_support import comfy_dir

    for d in (os.environ.get("COMFYUI_GGUF_PATH"), comfy_dir() / "custom_nodes" / "ComfyUI-GGUF"):
        if d and (Path(d) / "loader.py").is_file() and (Path(d) / "dequant.py").is_file():
            return Path(d)
    return None


def import_comfyui_gguf():
    """ComfyUI-GGUF's loader, dequant and ops modules, imported as a package without its node registration."""
    d = comfyui_gguf_dir()
    if d is None:
        return None
    name = "comfyui_gguf_under_test"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(d)]
        sys.modules[name] = pkg
    return types.SimpleNamespace(**{m: importlib.import_module(f"{name}.{m}") for m in ("dequant", "ops", "loader")})
