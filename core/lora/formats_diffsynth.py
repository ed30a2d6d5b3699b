"""DiffSynth-Studio LoRAs (read only): PEFT factors on the model's own module names, with no prefix, or with the
`pipe.dit.` / `dit.` prefix DiffSynth's trainer strips or keeps (`blocks.0.self_attn.q.lora_A.default.weight`).

For Wan 2.1/2.2 those names are ComfyUI's native ones, but ComfyUI 0.3.75 maps no bare Wan names: such a file loads
there only after conversion (`weightsmith convert --format comfy`). Qwen-Image's DiffSynth names are ComfyUI's too,
and ComfyUI loads them bare; files without the `pipe.dit.` prefix are read by the diffusers reader as well.
"""

from __future__ import annotations

from ..sources import TensorSource
from . import keymaps as km
from .formats_base import PEFT_SUFFIXES, Format, Target, assemble, group_keys, new_lora, register
from .model import LoRA
from .peft_metadata import KEY as PEFT_KEY
from .peft_metadata import alpha_resolver

_PREFIXES = ("pipe.dit.", "dit.")


def _name(prefix: str) -> str:
    for p in _PREFIXES:
        if prefix.startswith(p):
            return prefix[len(p):]
    return prefix


def _module(name: str) -> str | None:
    """The canonical module of a DiffSynth name: Wan's or Qwen-Image's own module names."""
    return km.DIFFUSION + name if km.is_wan_module(name) or km.is_qwen_module(name) else None


def detect_diffsynth(keys: list[str]) -> int:
    groups, _ = group_keys(keys, PEFT_SUFFIXES)
    wan = sum(len(roles) for p, roles in groups.items() if km.is_wan_module(_name(p)))
    dit = sum(len(roles) for p, roles in groups.items() if p.startswith(_PREFIXES) and _module(_name(p)))
    return wan + dit


def read_diffsynth(src: TensorSource, arch: str | None) -> LoRA:
    lora = new_lora(src, "diffsynth")
    groups, rest = group_keys(src.keys(), PEFT_SUFFIXES)
    lora.unknown_keys.extend(rest)

    def resolve(prefix: str) -> Target | None:
        module = _module(_name(prefix))
        return Target(module) if module else None

    assemble(src, groups, resolve, lora, alpha_resolver(src.metadata))
    lora.metadata.pop(PEFT_KEY, None)
    return lora


register(Format("diffsynth", "DiffSynth-Studio: [pipe.dit.]<Wan / Qwen-Image module>.lora_A[.default]/lora_B (read only)",
                detect_diffsynth, read_diffsynth))
