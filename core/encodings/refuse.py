"""Quantized layouts this pack recognises but cannot decode exactly: refused when the file is opened,
naming the file, a layer and the format, before anything is read or written.

Recognised from key names alone: nunchaku SVDQuant (int4/fp4 payload `qweight` with `wscales`, low-rank
branch `proj_down`/`proj_up`, `smooth_factor`), bitsandbytes 4-bit (`weight.absmax`, `weight.quant_map`,
`weight.quant_state.bitsandbytes__nf4|fp4`) and 8-bit (`SCB`), GPTQ/AWQ (`qweight` + `qzeros`/`scales`),
compressed-tensors packed weights (`weight_packed`), and NVFP4's second-level scale (`weight_scale_2`).
"""

from __future__ import annotations

from ..errors import UnsupportedEncodingError
from ..sources import TensorSource

# (format name, the key suffix that identifies a layer, other suffixes that must sit beside it)
SIGNATURES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("nunchaku SVDQuant (4-bit)", ".qweight", (".wscales",)),
    ("nunchaku SVDQuant (4-bit)", ".smooth_factor", (".proj_down",)),
    ("bitsandbytes 4-bit (nf4/fp4)", ".weight.absmax", (".weight",)),
    ("bitsandbytes 4-bit (nf4/fp4)", ".weight.quant_map", (".weight",)),
    ("bitsandbytes 4-bit (nf4/fp4)", ".weight.quant_state.bitsandbytes__nf4", ()),
    ("bitsandbytes 4-bit (nf4/fp4)", ".weight.quant_state.bitsandbytes__fp4", ()),
    ("bitsandbytes 8-bit (LLM.int8)", ".SCB", (".weight",)),
    ("GPTQ/AWQ 4-bit", ".qweight", (".qzeros",)),
    ("GPTQ/AWQ 4-bit", ".qweight", (".scales",)),
    ("compressed-tensors packed 4-bit", ".weight_packed", ()),
    ("NVFP4 (two-level scales)", ".weight_scale_2", (".weight",)),
)


def check(source: TensorSource) -> None:
    keys = set(source.keys())
    for k in source.keys():
        for fmt, suffix, beside in SIGNATURES:
            if not k.endswith(suffix):
                continue
            layer = k[: -len(suffix)]
            if all(layer + b in keys for b in beside):
                n = sum(1 for x in keys if x.endswith(suffix))
                raise UnsupportedEncodingError(
                    f"{source.name}: layer {layer!r} is stored as {fmt} ({n} layers); this pack cannot decode "
                    "that encoding exactly, and reading its payload as weights would give noise. Use a bf16, fp8 "
                    "or ComfyUI scaled-fp8 version of the model (or dequantize it with the tool that made it)")
