"""How a weight is stored on disk when it is not a plain float tensor (shared by decode and encode).

Minimal form written by the output side (quant-encode); the decode side owns this module."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class KeyEncoding:
    """One encoded key: `format` ("fp8_scaled", "comfy_quant:<fmt>", "diffusers_fp8", "gguf:<QTYPE>"),
    the payload's stored dtype and shape, and `side`: role (e.g. "input_scale") -> raw key of a side
    tensor kept for re-encoding."""

    format: str
    stored_dtype: torch.dtype
    stored_shape: tuple[int, ...]
    side: dict[str, str] = field(default_factory=dict)
