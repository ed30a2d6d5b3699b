"""Which architecture and naming a state dict uses, from its key names and shapes alone."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sources import TensorSource, detect_diffusion_prefix

ARCHES = ("flux-dev", "flux-schnell", "chroma", "sdxl", "sd15", "qwen-image", "wan", "flux2", "lumina2", "hidream", "sd3")


# Architectures whose weights and LoRAs share one key space. Model names (flux-dev, flux-schnell) and LoRA
# names (flux) both map here, so every up-front "same architecture?" check (mix, bake, validate, LoRA loading)
# uses this one table: Flux.2 is NOT Flux, although its name starts with "flux".
_FAMILIES = {"flux": "flux", "flux-dev": "flux", "flux-schnell": "flux", "chroma": "flux", "sdxl": "sd",
             "sd15": "sd"}
OWN_FAMILY_ARCHES = ("qwen-image", "wan", "flux2", "lumina2", "hidream", "sd3")


def arch_family(arch: str) -> str:
    """The family of a model or LoRA architecture name: 'flux' (Flux dev/schnell, Chroma), 'sd' (SD1.5, SDXL: the
    caller tells them apart), each newer architecture its own, else 'unknown'."""
    return _FAMILIES.get(arch, arch if arch in OWN_FAMILY_ARCHES else "unknown")


@dataclass
class ArchInfo:
    arch: str  # one of ARCHES or "unknown"
    naming: str  # "bfl" (ComfyUI/BFL single file), "diffusers", "ldm" (SD UNets), "native" (ComfyUI's own
    # names for models that have no other here: Qwen-Image, whose names are diffusers' too, and Wan), or "unknown"
    prefix: str  # the prefix the diffusion model's keys carry in the file
    details: dict = field(default_factory=dict)
    reason: str = ""

    @property
    def family(self) -> str:
        """'flux' for Flux dev/schnell and Chroma (one LoRA key space), 'sd' for SD UNets."""
        return arch_family(self.arch)

    @property
    def lora_arch(self) -> str:
        """The architecture name LoRAs use: flux, chroma, sdxl, sd15, qwen-image, wan (dev and schnell share
        LoRAs; so do Wan 2.1 and 2.2 models of one size)."""
        return "flux" if self.arch in ("flux-dev", "flux-schnell") else self.arch

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
    """Detect Flux dev / schnell, Chroma, SDXL, SD1.5 (UNet), Qwen-Image or Wan 2.1/2.2 from a full model's keys and shapes."""
    raw = source.keys()
    prefix = detect_diffusion_prefix(raw)
    keys = {k[len(prefix):] for k in raw if k.startswith(prefix)}

    def shape(k: str) -> tuple[int, ...] | None:
        return source.info(prefix + k).shape if k in keys else None

    if "double_blocks.0.img_attn.qkv.weight" in keys or "double_blocks.0.img_attn.norm.key_norm.scale" in keys:
        hidden = (shape("img_in.weight") or shape("double_blocks.0.img_attn.proj.weight") or (0,))[0]
        details = {"hidden": hidden, "double_blocks": _count(keys, "double_blocks."), "single_blocks": _count(keys, "single_blocks.")}
        if "double_stream_modulation_img.lin.weight" in keys:  # ComfyUI's Flux.2 test: shared modulations
            return ArchInfo("flux2", "bfl", prefix, _flux2_details(details, keys, _params(source, prefix, keys)))
        if any(k.startswith("distilled_guidance_layer.") for k in keys):
            radiance = "nerf_blocks.0.norm.scale" in keys  # ComfyUI's test: pixel-space Chroma, no img_in
            return ArchInfo("chroma", "bfl", prefix, details | ({"variant": "Chroma Radiance"} if radiance else {}))
        arch = "flux-dev" if "guidance_in.in_layer.weight" in keys else "flux-schnell"
        return ArchInfo(arch, "bfl", prefix, details)
    if "single_stream_modulation.linear.weight" in keys:  # diffusers' Flux2Transformer2DModel
        hidden = (shape("x_embedder.weight") or (0,))[0]
        details = {"hidden": hidden, "double_blocks": _count(keys, "transformer_blocks."),
                   "single_blocks": _count(keys, "single_transformer_blocks.")}
        return ArchInfo("flux2", "diffusers", prefix, _flux2_details(details, keys, _params(source, prefix, keys)),
                        reason="diffusers-named Flux.2: ComfyUI 0.3.75 loads Flux.2 models in their BFL names only")
    if "transformer_blocks.0.attn.to_q.weight" in keys and any(k.startswith("single_transformer_blocks.") for k in keys):
        hidden = (shape("x_embedder.weight") or (0,))[0]
        details = {"hidden": hidden, "double_blocks": _count(keys, "transformer_blocks."),
                   "single_blocks": _count(keys, "single_transformer_blocks.")}
        if any(k.startswith("distilled_guidance_layer.") for k in keys):
            return ArchInfo("chroma", "diffusers", prefix, details)
        guided = any(k.startswith("time_text_embed.guidance_embedder.") for k in keys)
        return ArchInfo("flux-dev" if guided else "flux-schnell", "diffusers", prefix, details)
    if "txt_norm.weight" in keys and "img_in.weight" in keys:  # ComfyUI's own Qwen-Image test
        return ArchInfo("qwen-image", "native", prefix, _qwen_details(keys, shape, _params(source, prefix, keys)))
    if "head.modulation" in keys and "patch_embedding.weight" in keys:  # ComfyUI's own Wan 2.x test
        return ArchInfo("wan", "native", prefix, _wan_details(keys, shape, _params(source, prefix, keys)))
    if "condition_embedder.time_embedder.linear_1.weight" in keys and "blocks.0.attn1.to_q.weight" in keys:
        return ArchInfo("wan", "diffusers", prefix, {"dim": shape("blocks.0.attn1.to_q.weight")[0],
                                                     "layers": _count(keys, "blocks.")},
                        reason="diffusers-named Wan: ComfyUI 0.3.75 loads Wan models in its native names only")
    other = _other_dit(keys, shape)
    if other is not None:
        arch, details = other
        naming = details.pop("naming", "native")
        return ArchInfo(arch, naming, prefix, details | {"size": _size(_params(source, prefix, keys))},
                        reason=_OTHER_REASONS.get((arch, naming), ""))
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
    return ArchInfo("unknown", "unknown", prefix, {}, reason=f"{source.name}: {explain_unknown(keys)}")


_OTHER_REASONS = {
    ("lumina2", "diffusers"): "diffusers-named Z-Image: ComfyUI 0.3.75 loads Lumina 2 / Z-Image models in its native "
                              "names only",
    ("sd3", "diffusers"): "diffusers-named SD3: ComfyUI 0.3.75 loads SD3 checkpoints in their MMDiT names",
}


def _other_dit(keys: set[str], shape) -> tuple[str, dict] | None:
    """Lumina 2 / Z-Image, HiDream and SD3/3.5 (MMDiT) from the keys ComfyUI 0.3.75's model_detection tests."""
    if "cap_embedder.1.weight" in keys and ("layers.0.attention.qkv.weight" in keys or "all_x_embedder.2-1.weight" in keys
                                            or "x_embedder.weight" in keys):
        dim = shape("cap_embedder.1.weight")[0]
        # Z-Image's blocks take one shared modulation (adaLN_modulation.0 only); Lumina 2's have adaLN_modulation.1
        zimage = "layers.0.adaLN_modulation.1.weight" not in keys
        diffusers = "all_x_embedder.2-1.weight" in keys
        qkv = [shape(f"layers.0.attention.{p}.weight") for p in ("to_q", "to_k")] if diffusers else [
            shape("layers.0.attention.qkv.weight")]
        details = {"variant": "Z-Image" if zimage else "Lumina 2", "dim": dim, "layers": _count(keys, "layers."),
                   "refiner_layers": _count(keys, "noise_refiner."),
                   "attention": "grouped-query" if None not in qkv and (
                       qkv[0][0] != qkv[1][0] if diffusers else qkv[0][0] != 3 * dim) else "full"}
        return "lumina2", details | ({"naming": "diffusers"} if diffusers else {})
    if "caption_projection.0.linear.weight" in keys:
        double, single = _count(keys, "double_stream_blocks."), _count(keys, "single_stream_blocks.")
        experts = _count(keys, "double_stream_blocks.0.block.ff_i.experts.")
        inner = (shape("x_embedder.proj.weight") or (0,))[0]
        # HiDream-I1 full, dev and fast share every key and shape (dev/fast are distillations): the weights cannot tell
        variant = "HiDream-I1 (full/dev/fast)" if (double, single, inner) == (16, 32, 2560) else "HiDream"
        return "hidream", {"variant": variant, "hidden": inner, "double_blocks": double, "single_blocks": single,
                           "experts": experts}
    if "pos_embed.proj.weight" in keys and "transformer_blocks.0.attn.to_q.weight" in keys:  # diffusers SD3Transformer2DModel
        depth = _count(keys, "transformer_blocks.")
        variant = "SD3.5 Medium" if any(".attn2." in k for k in keys) else (
            "SD3.5 Large" if depth == 38 else "SD3 Medium" if depth == 24 else f"{depth} joint blocks")
        return "sd3", {"variant": variant, "depth": depth, "hidden": shape("pos_embed.proj.weight")[0],
                       "naming": "diffusers"}
    if "joint_blocks.0.context_block.attn.qkv.weight" in keys:
        depth = _count(keys, "joint_blocks.")
        variant = "SD3.5 Medium" if any(".x_block.attn2." in k for k in keys) else (
            "SD3.5 Large" if depth == 38 else "SD3 Medium" if depth == 24 else f"{depth} joint blocks")
        return "sd3", {"variant": variant, "depth": depth, "hidden": shape("x_embedder.proj.weight")[0]
                       if "x_embedder.proj.weight" in keys else None}
    return None


def _params(source: TensorSource, prefix: str, keys: set[str]) -> int:
    return sum(source.info(prefix + k).numel for k in keys)


def _size(params: int) -> str:
    return f"{params / 1e9:.1f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"


def _flux2_details(details: dict, keys: set[str], params: int) -> dict:
    # Flux.2 [dev] (32B): hidden 6144, 8 double and 48 single blocks; other widths are named by their shape
    dev = (details["hidden"], details["double_blocks"], details["single_blocks"]) == (6144, 8, 48)
    guided = "guidance_in.in_layer.weight" in keys or "time_guidance_embed.guidance_embedder.linear_1.weight" in keys
    variant = "Flux.2 dev" if dev else f"Flux.2 ({details['double_blocks']} double, {details['single_blocks']} single blocks)"
    return details | {"variant": variant, "guidance": guided, "size": _size(params)}


def _qwen_details(keys: set[str], shape, params: int) -> dict:
    hidden = shape("img_in.weight")[0]
    blocks = _count(keys, "transformer_blocks.")
    # Qwen-Image and Qwen-Image-Edit (2509, 2511) share every key and shape: the weights cannot tell them apart
    return {"variant": "Qwen-Image / Qwen-Image-Edit", "hidden": hidden, "blocks": blocks,
            "in_channels": shape("img_in.weight")[1], "size": _size(params)}


def _wan_details(keys: set[str], shape, params: int) -> dict:
    dim = shape("head.modulation")[-1]
    in_dim = shape("patch_embedding.weight")[1]
    out_dim = shape("head.head.weight")[0] // 4
    extra = {"vace_patch_embedding.weight": "vace", "control_adapter.conv.weight": "camera",
             "casual_audio_encoder.encoder.final_linear.weight": "s2v", "face_adapter.fuser_blocks.0.k_norm.weight": "animate"}
    kind = next((v for k, v in extra.items() if k in keys), None)
    if kind is not None:
        variant, version = kind, "2.1/2.2"
    elif out_dim == 48:
        variant, version = "ti2v", "2.2"  # the 5B model with its own VAE (48 latent channels)
    elif "img_emb.proj.0.bias" in keys:
        variant, version = "i2v", "2.1"  # CLIP-vision image embedding: Wan 2.1 I2V/FLF2V
    elif in_dim > 16:
        variant, version = "i2v", "2.2"  # image latents concatenated, no CLIP embedding: Wan 2.2 I2V-A14B expert
    else:
        variant, version = "t2v", "2.1 or 2.2"  # Wan 2.2 T2V-A14B experts have Wan 2.1 14B's keys and shapes
    return {"variant": variant, "version": version, "dim": dim, "layers": _count(keys, "blocks."),
            "in_dim": in_dim, "size": _size(params)}


def _pattern_share(keys: set[str]) -> dict[str, float]:
    """Per known architecture, the share of the file's weight keys whose module that architecture names."""
    from .lora import keymaps as km

    mods = [k[: -len(".weight")] for k in keys if k.endswith(".weight")] or [k for k in keys]
    tests = _module_tests()
    tests["sd15/sdxl"] = lambda n: bool(km.SD_LDM_RE.match(n) or km.SD_DIFFUSERS_RE.match(n))
    return {a: sum(bool(t(m)) for m in mods) / len(mods) for a, t in tests.items()} if mods else {}


def _module_tests() -> dict:
    """Per DiT architecture, whether a module name (no prefix) is one of its layers."""
    from .lora import keymaps as km
    from .lora import keymaps_flux2, keymaps_hidream, keymaps_lumina2, keymaps_sd3

    return {"flux/chroma": km.is_flux_module, "flux2": keymaps_flux2.is_flux2_module, "qwen-image": km.is_qwen_module,
            "wan": km.is_wan_module, "lumina2": keymaps_lumina2.is_lumina_module,
            "hidream": keymaps_hidream.is_hidream_module, "sd3": keymaps_sd3.is_sd3_module}


def explain_unknown(keys: set[str]) -> str:
    """Why no architecture matched: the closest known one and keys it does not name."""
    if not keys:
        return "no diffusion-model keys at all"
    share = _pattern_share(keys)
    best = max(share, key=lambda a: share[a]) if share else None
    sample = ", ".join(sorted(keys)[:5])
    known = "Flux/Chroma/Flux.2/SDXL/SD1.5/Qwen-Image/Wan/Lumina 2/Z-Image/HiDream/SD3"
    if best is None or share[best] == 0:
        return (f"no Flux/Chroma/SDXL/SD1.5 key pattern (nor Flux.2, Qwen-Image, Wan, Lumina 2, Z-Image, HiDream, SD3) "
                f"found among {len(keys)} keys ({sample}, …)")
    test = _module_tests().get(best)
    odd = sorted(k for k in keys if k.endswith(".weight") and test is not None and not test(k[: -len(".weight")]))
    return (f"no {known} model; closest is {best} ({share[best]:.0%} of its {len(keys)} keys are {best} layer names), "
            f"but its tell-tale keys are missing" + (f" and these differ: {', '.join(odd[:5])}"
                                                     + (f", … ({len(odd)} in all)" if len(odd) > 5 else "") if odd else ""))
