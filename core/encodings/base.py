"""What a source tells about how one key is stored when it is not a plain dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyEncoding:
    """How a key is stored: `format` names the encoding (e.g. "gguf:Q8_0"), `stored_dtype`/`stored_shape`
    describe the payload as stored (torch order), `side` maps roles to the side tensors it needs (scales)."""

    format: str
    stored_dtype: torch.dtype
    stored_shape: tuple[int, ...]
    side: dict[str, str]
