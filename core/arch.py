"""Which architecture and naming a state dict uses, from its key names and shapes alone."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sources import TensorSource, detect_diffusion_prefix

ARCHES = ("flux-dev", "flux-schnell", "chroma", "sdxl", "sd15")


@dataclass
class ArchInfo:
    arch: str  # one of ARCHES or "unknown"
    naming: str  # "bfl" (ComfyUI/BFL single file), "diffusers", "ldm" (SD UNets), or "unknown"
    prefix: str  # the prefix the diffusion model's keys carry in the file
    details: dict = field(default_factory=dict)
    reason: str = ""

    @property
    def family(self) -> str:
        """'flux' for Flux dev/schnell and Chroma (one LoRA key space), 'sd' for SD UNets."""
        if self.arch.startswith("flux") or self.arch == "chroma":
            return "flux"
        if self.arch in ("sdxl", "sd15"):
            return "sd"
        return "unknown"

    @property
    def lora_arch(self) -> str:
        """The architecture name LoRAs use: flux, chroma, sdxl, sd15 (dev and schnell share LoRAs)."""
        return "flux" if self.arch.startswith("flux") else self.arch

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items())
        return f"{self.arch} ({self.naming} names{', ' + extra if extra else ''})"


def _count(keys: set[str], prefix: str) -> int:
    n = set()
    for k in keys:
        if k.startswith(prefix):
            n.add(k[len(prefix):].split(".", 1)[0])
    return len(n)


def detect_arch(source: TensorSource) -> ArchInfo:
    """Detect Flux dev / schnell, Chroma, SDXL or SD1.5 (UNet) from a full model's keys and shapes."""
    raw = source.keys()
    prefix = detect_diffusion_prefix(raw)
    keys = {k[len(prefix):] for k in raw if k.startswith(prefix)}

    def shape(k: str) -> tuple[int, ...] | None:
        return source.info(prefix + k).shape if k in keys else None

    if "double_blocks.0.img_attn.qkv.weight" in keys or "double_blocks.0.img_attn.norm.key_norm.scale" in keys:
        hidden = (shape("img_in.weight") or shape("double_blocks.0.img_attn.proj.weight") or (0,))[0]
        details = {"hidden": hidden, "double_blocks": _count(keys, "double_blocks."), "single_blocks": _count(keys, "single_blocks.")}
        if any(k.startswith("distilled_guidance_layer.") for k in keys):
            return ArchInfo("chroma", "bfl", prefix, details)
        arch = "flux-dev" if "guidance_in.in_layer.weight" in keys else "flux-schnell"
        return ArchInfo(arch, "bfl", prefix, details)
    if "transformer_blocks.0.attn.to_q.weight" in keys and any(k.startswith("single_transformer_blocks.") for k in keys):
        hidden = (shape("x_embedder.weight") or (0,))[0]
        details = {"hidden": hidden, "double_blocks": _count(keys, "transformer_blocks."),
                   "single_blocks": _count(keys, "single_transformer_blocks.")}
        if any(k.startswith("distilled_guidance_layer.") for k in keys):
            return ArchInfo("chroma", "diffusers", prefix, details)
        guided = any(k.startswith("time_text_embed.guidance_embedder.") for k in keys)
        return ArchInfo("flux-dev" if guided else "flux-schnell", "diffusers", prefix, details)
    if "input_blocks.0.0.weight" in keys:
        ctx = None
        for k in sorted(keys):
            if k.endswith("attn2.to_k.weight"):
                ctx = shape(k)[1]
                break
        mc = shape("input_blocks.0.0.weight")[0]
        details = {"model_channels": mc, "context_dim": ctx}
        if "label_emb.0.0.weight" in keys or ctx == 2048:
            return ArchInfo("sdxl", "ldm", prefix, details)
        if ctx == 768 or ctx is None:
            return ArchInfo("sd15", "ldm", prefix, details)
        return ArchInfo("unknown", "ldm", prefix, details, reason=f"an SD-style UNet with context dim {ctx} (SD2.x?)")
    if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        arch = "sdxl" if any(k.startswith("add_embedding.") for k in keys) else "sd15"
        return ArchInfo(arch, "diffusers", prefix, {})
    sample = ", ".join(sorted(keys)[:5])
    return ArchInfo("unknown", "unknown", prefix, {},
                    reason=f"{source.name}: no Flux/Chroma/SDXL/SD1.5 key pattern found among {len(keys)} keys ({sample}, …)")
