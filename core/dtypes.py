"""dtype names: the user's spelling, torch's, and safetensors' header codes, in one table."""

from __future__ import annotations

import math

import torch

# safetensors header code -> torch dtype. Only dtypes torch can hold are listed; anything else is refused.
SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

# What users type on the command line or pick in a node.
USER_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp64": torch.float64,
}
OUTPUT_DTYPE_CHOICES = ["keep", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"]
# Model outputs (merge, mix) also take encodings: ComfyUI scaled fp8 with a fresh per-tensor scale
# (encodings/encode.py); `keep` there keeps each input encoding it can write back.
MODEL_OUTPUT_CHOICES = [*OUTPUT_DTYPE_CHOICES, "fp8_scaled", "fp8_scaled_e5m2"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' -> torch.bfloat16; None or 'keep' -> None (keep each input's dtype)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = name.strip().lower()
    if key in ("", "keep", "same", "auto"):
        return None
    if key not in USER_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(OUTPUT_DTYPE_CHOICES)}")
    return USER_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in USER_NAMES.items():
        if d == dtype:
            return name
    return str(dtype).replace("torch.", "")


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def cast_for_output(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a computed fp32 tensor to the output dtype. fp8 saturates instead of overflowing to NaN:
    e4m3fn has no inf, so an out-of-range value would otherwise become NaN."""
    if dtype in FP8_DTYPES and t.dtype != dtype:
        if dtype == torch.float8_e4m3fn and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous():
            from .encodings import fp8_native  # the native cast: the same bits (checked over all fp32 values)

            if fp8_native.library() is not None:
                out = torch.empty(t.shape, dtype=dtype)
                fp8_native.quantize_e4m3(t, out, 1.0, True)
                return out
        info = torch.finfo(dtype)
        t = t.float().clamp(info.min, info.max)
    return t.to(dtype)


def fp8_nonfinite(t: torch.Tensor, nan_only: bool = False) -> bool:
    """Whether an fp8 tensor holds a non-finite code (NaN for e4m3fn, which has no Inf; Inf or NaN for e5m2;
    `nan_only`: NaN alone), from its bytes: torch has no fp8 kernels, and its conversion to fp16 for a
    sum runs one element at a time (measured: most of a bake into an fp8 model)."""
    u = t.contiguous().view(torch.uint8)
    if t.dtype == torch.float8_e4m3fn:
        return bool(torch.bitwise_and(u, 0x7F).eq_(0x7F).any())
    low = torch.bitwise_and(u, 0x7F)
    return bool(low.gt_(0x7C).any()) if nan_only else bool(low.ge_(0x7C).any())


def all_finite(t: torch.Tensor) -> bool:
    """Every value of `t` is finite. One sum in `t`'s own dtype first: NaN/Inf propagate into it, and it is
    the cheapest full pass (measured on one thread, bf16: ~4x faster than aminmax and ~20x faster than a
    sum with dtype=float32; isfinite is slower still). Only a non-finite sum, which finite values can
    also give by overflowing (fp16 beyond 65504), pays for the exact check."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in FP8_DTYPES:
        return not fp8_nonfinite(t)
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())
