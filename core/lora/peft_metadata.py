"""PEFT / diffusers `lora_adapter_metadata` (safetensors metadata, JSON): the scale a PEFT loader applies.

PEFT scales each module by lora_alpha / r (lora_alpha / √r with use_rslora), taking r from `rank_pattern`
and lora_alpha from `alpha_pattern` where a pattern matches the module name (`(.*\\.)?<pattern>$`), else the
config's `r` / `lora_alpha`. diffusers pipelines store it per component, keys prefixed `transformer.`,
`unet.`, `text_encoder.`; a model-level save stores it flat.

Reading applies that scale (as the term's alpha); writing never copies an input's metadata: the diffusers
writer bakes every scale into lora_B, so `fresh_metadata` describes exactly that file (scale 1 per module,
every module's rank listed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

import torch

KEY = "lora_adapter_metadata"
_COMPONENTS = ("transformer", "unet", "text_encoder", "text_encoder_2")


def _config_for(meta: dict, component: str | None) -> dict:
    if component and any(k.startswith(component + ".") for k in meta):
        return {k[len(component) + 1:]: v for k, v in meta.items() if k.startswith(component + ".")}
    if any(k.split(".", 1)[0] in _COMPONENTS and "." in k for k in meta):
        return {}
    return meta


def _pattern(patterns: dict, name: str, default):
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", name):
            return value
    return default


def alpha_resolver(metadata: dict[str, str]) -> Callable[[str, int], float | None] | None:
    """prefix, tensor rank -> the alpha giving PEFT's scale (alpha / rank == PEFT's scaling); None without
    PEFT metadata."""
    raw = metadata.get(KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None

    def alpha_of(prefix: str, rank: int) -> float | None:
        component, _, name = prefix.partition(".")
        if component not in _COMPONENTS:
            component, name = None, prefix
        cfg = _config_for(meta, component)
        if not cfg or ("lora_alpha" not in cfg and "alpha_pattern" not in cfg):
            return None
        r = float(_pattern(cfg.get("rank_pattern"), name, cfg.get("r", rank)) or rank)
        a = float(_pattern(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", r)))
        scale = a / math.sqrt(r) if cfg.get("use_rslora") else a / r
        return scale * rank

    return alpha_of


def fresh_metadata(sd: dict[str, torch.Tensor]) -> str:
    """`lora_adapter_metadata` for a diffusers file whose scales are baked into lora_B (scale 1 per module)."""
    per: dict[str, dict[str, int]] = {}
    for k, v in sd.items():
        if k.endswith(".lora_A.weight"):
            component, _, name = k[: -len(".lora_A.weight")].partition(".")
            per.setdefault(component, {})[name] = int(v.shape[0])
    out: dict = {}
    for component, ranks in sorted(per.items()):
        common = max(set(ranks.values()), key=list(ranks.values()).count)
        out[f"{component}.r"] = common
        out[f"{component}.lora_alpha"] = common
        out[f"{component}.rank_pattern"] = {n: r for n, r in sorted(ranks.items())}
        out[f"{component}.alpha_pattern"] = {n: r for n, r in sorted(ranks.items())}
        out[f"{component}.target_modules"] = sorted(ranks)
    return json.dumps(out, sort_keys=True) if out else ""
