"""LoRA in and out: load any format from `loras/`, convert format/architecture, Flux -> Chroma, save, and apply
to a MODEL through ComfyUI's own LoRA loader. Thin: sockets/widgets -> `core.lora.formats` / `core.lora.convert`."""

from __future__ import annotations

import comfy.sd
import folder_paths

from ..core.dtypes import OUTPUT_DTYPE_CHOICES, parse_dtype
from ..core.errors import MismatchError
from ..core.lora import keymaps
from ..core.lora.convert import convert_lora, flux_to_chroma
from ..core.lora.fit import check_lora_fits
from ..core.lora.formats import (
    LORA_ARCHES,
    WRITABLE_FORMATS,
    load_lora,
    lora_state_dict,
    lora_summary,
    reformat_lora,
    save_lora,
)
from ..core.lora.model import LoRA
from ..core.lora.reproject import REPROJECT_METHODS, ReprojectOptions, reproject_flux_to_chroma
from ..core.provenance import describe as describe_provenance
from ..core.report import an_arch, arch_name
from .common import (
    CATEGORY,
    LORA_TYPE,
    MAX_RANK,
    MODEL_FILE_TOOLTIP,
    STRENGTH,
    PatcherSource,
    compute_device,
    input_path,
    model_arch,
    model_file_choices,
    output_path,
    progress,
    resolve_model_file,
    ui_report,
)

ARCH_CHOICES = ["auto", *LORA_ARCHES]
SUBCATEGORY = f"{CATEGORY}/LoRA"


def _describe(lora: LoRA, title: str) -> tuple[str, dict]:
    s = lora_summary(lora)
    lines = [f"{title}: {s['arch']} LoRA, {s['format']} format",
             f"{s['modules']} modules ({s['lowrank_modules']} low-rank, rank {s['rank_min']}..{s['rank_max']}; "
             f"{s['diff_modules']} full diffs, {s['bias_modules']} bias diffs, {s['set_modules']} replacements)"]
    if lora.unknown_keys:
        lines.append(f"{len(lora.unknown_keys)} keys not understood: " + ", ".join(lora.unknown_keys[:6])
                     + (" …" if len(lora.unknown_keys) > 6 else ""))
    return "\n".join(lines), s


class WeightsmithLoadLoRA:
    DESCRIPTION = ("Load a LoRA file from the loras folder in any known format (ComfyUI, kohya, diffusers/PEFT/"
                   "ai-toolkit, OneTrainer, XLabs, BFL control, PEFT-on-BFL). Format and architecture are detected "
                   "and shown; keys that are not understood are listed, never silently dropped.")
    CATEGORY = SUBCATEGORY
    FUNCTION = "load"
    OUTPUT_NODE = False
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "info")
    OUTPUT_TOOLTIPS = ("The LoRA in Weightsmith's exact in-memory form (any format, one representation).",
                       "Detected format, architecture, modules and ranks as text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A LoRA file in ComfyUI's loras folder."}),
                "arch": (ARCH_CHOICES, {"default": "auto", "tooltip": "The model family the LoRA is for; auto detects "
                                        "it from the layer names (a Flux LoRA without modulation layers reads as flux)."}),
            }
        }

    def load(self, lora_name, arch):
        path = input_path("loras", lora_name)
        lora = load_lora(path, arch=None if arch == "auto" else arch)
        text, data = _describe(lora, lora_name)
        provenance = describe_provenance(lora.metadata)  # how the file was made: modelspec keys, recipe
        text += "\n" + "\n".join(provenance)
        data["provenance"] = provenance
        return {"ui": ui_report(text, data), "result": (lora, text)}


class WeightsmithSaveLoRA:
    DESCRIPTION = ("Save a LoRA into the loras folder as .safetensors in the chosen format (ComfyUI, kohya, diffusers, "
                   "OneTrainer). The change each layer receives is preserved exactly; fused q/k/v are split or joined "
                   "as the format needs; a module the format cannot hold is refused by name, never dropped. Never "
                   "overwrites: a counter is appended.")
    CATEGORY = SUBCATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the written file.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA_TYPE, {"tooltip": "The LoRA to save."}),
                "filename_prefix": ("STRING", {"default": "weightsmith/lora", "tooltip": "File name under the loras "
                                               "folder (subfolders allowed); a counter and .safetensors are added."}),
                "format": (["same as input", *WRITABLE_FORMATS], {"default": "comfy", "tooltip": "Key format of the "
                           "file: comfy (ComfyUI-native), kohya, diffusers (PEFT/ai-toolkit) or onetrainer. 'same as "
                           "input' keeps the loaded file's format when it is writable, else comfy."}),
                "dtype": (OUTPUT_DTYPE_CHOICES, {"default": "keep", "tooltip": "Storage dtype of factors and diffs; "
                          "keep = as loaded. Alphas are always stored as fp32 scalars."}),
            }
        }

    def save(self, lora, filename_prefix, format, dtype):
        fmt = format
        if fmt == "same as input":
            fmt = lora.source_format if lora.source_format in WRITABLE_FORMATS else "comfy"
        path = output_path("loras", filename_prefix)
        save_lora(lora, path, fmt=fmt, dtype=parse_dtype(dtype))  # every module, or an error naming them
        text = f"saved {path.name} ({fmt}, {lora.arch}, {len(lora.modules)} modules)"
        if fmt == "onetrainer" and lora.arch in ("sd15", "sdxl"):
            text += "\nOneTrainer names SD UNet and CLIP layers as kohya does (lora_unet_*, lora_te*_*)"
        data = {"path": str(path), "format": fmt, "arch": lora.arch, "modules": len(lora.modules)}
        return {"ui": ui_report(text, data), "result": (str(path),)}


class WeightsmithConvertLoRA:
    DESCRIPTION = ("Convert a LoRA to another key format and/or architecture (Flux <-> Chroma), exactly: the change "
                   "of every kept layer is identical. Layers the target architecture lacks are dropped and listed; a "
                   "module the target format cannot hold is refused by name. The format matters when saving ('same "
                   "as input') or for other nodes that read it.")
    CATEGORY = SUBCATEGORY
    FUNCTION = "convert"
    OUTPUT_NODE = False
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The converted LoRA.", "What was kept, dropped and not understood, as text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA_TYPE, {"tooltip": "The LoRA to convert."}),
                "target_format": (list(WRITABLE_FORMATS), {"default": "comfy", "tooltip": "Key format to convert to."}),
                "target_arch": (["keep", *LORA_ARCHES], {"default": "keep", "tooltip": "Architecture to retarget to: "
                                "flux <-> chroma is a remap; other pairs share no layers and are refused."}),
            }
        }

    def convert(self, lora, target_format, target_arch):
        out, report = convert_lora(lora, None if target_arch == "keep" else target_arch)
        # Going through the target format proves it holds every module (and gives its exact factors); a module
        # it cannot hold, or one its names would not bring back, is refused by name, never dropped.
        converted = reformat_lora(out, target_format)
        text = f"{lora.source_format} -> {target_format}\n" + report.text()
        return {"ui": ui_report(text, report.to_dict()), "result": (converted, text)}


class WeightsmithFluxToChroma:
    DESCRIPTION = ("Make a Flux LoRA usable on Chroma without any base model: Chroma keeps every Flux attention/MLP "
                   "layer with the same name and shape, so those changes carry over exactly; the modulation layers "
                   "Chroma removed (img_mod, txt_mod, single-block modulation, final adaLN, time/vector/guidance "
                   "embedders) and CLIP text-encoder layers are dropped and listed in the report.")
    CATEGORY = SUBCATEGORY
    FUNCTION = "convert"
    OUTPUT_NODE = False
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The LoRA for Chroma.", "Kept / dropped / unknown counts and names, as text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": (LORA_TYPE, {"tooltip": "A Flux (dev or schnell) LoRA."})}}

    def convert(self, lora):
        out, report = flux_to_chroma(lora)
        text = report.text()
        return {"ui": ui_report(text, report.to_dict()), "result": (out, text)}


class WeightsmithReprojectFluxToChroma:
    DESCRIPTION = ("Opt-in alternative to the exact Flux LoRA to Chroma: reshape each kept layer's change with the "
                   "Flux and Chroma base models (read one layer at a time from their files), then re-extract a LoRA "
                   "of the chosen rank. Methods act on the LoRA's change only, random draws are seeded, and the "
                   "strength is applied once. add_difference equals the exact conversion (up to the rank).")
    CATEGORY = SUBCATEGORY
    FUNCTION = "convert"
    OUTPUT_NODE = False
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The re-projected LoRA for Chroma (alpha = rank, scale 1).",
                       "Kept / dropped counts, and how much the method changed each layer, as text.")

    @classmethod
    def INPUT_TYPES(cls):
        models = model_file_choices()
        return {
            "required": {
                "lora": (LORA_TYPE, {"tooltip": "A Flux LoRA."}),
                "flux_model": (models, {"tooltip": f"The Flux base model file the LoRA was trained on "
                                                   f"({MODEL_FILE_TOOLTIP})."}),
                "chroma_model": (models, {"tooltip": "The Chroma model file to convert to."}),
                "method": (list(REPROJECT_METHODS), {"default": "comparative", "tooltip": "add_difference: the change "
                           "as is; comparative: masked where the bases disagree (interpolation mask of the bases); "
                           "add_dissimilar: rows scaled by their cosine with the Chroma-vs-Flux shift."}),
                "rank": ("INT", {"default": 32, "min": 1, "max": MAX_RANK, "step": 1,
                                 "tooltip": "Rank of the re-extracted LoRA."}),
                "strength": ("FLOAT", {**STRENGTH, "tooltip": "LoRA strength, applied once before the method."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the comparative mask "
                                 "and the randomized SVD: the same seed gives the same file."}),
                "alpha": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "comparative: "
                                    "the mask weight's exponent is 1/alpha - 1 (1 = no masking)."}),
                "beta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "comparative: 1 "
                                   "uses the difference weight; add_dissimilar: 1 keeps the dissimilar features."}),
                "gamma": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "comparative: "
                                    "0 = Bernoulli mask .. 1 = soft mask; add_dissimilar: exponent of the similarity."}),
                "multiplier": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                         "tooltip": "add_dissimilar: scale of the result."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def convert(self, lora, flux_model, chroma_model, method, rank, strength, seed, alpha, beta, gamma, multiplier,
                unique_id=None):
        opts = ReprojectOptions(method, rank, strength, alpha, beta, gamma, multiplier, seed)
        out, report = reproject_flux_to_chroma(
            lora, resolve_model_file(flux_model), resolve_model_file(chroma_model), opts,
            device=compute_device(), progress=progress(len(lora.modules), unique_id))
        text = report.text()
        return {"ui": ui_report(text, report.to_dict()), "result": (out, text)}


class WeightsmithApplyLoRA:
    DESCRIPTION = ("Apply a LORA to a MODEL through ComfyUI's own LoRA loader (comfy.sd.load_lora_for_models), so it "
                   "behaves exactly like LoraLoaderModelOnly, whatever format the LoRA came in (XLabs and PEFT-on-BFL "
                   "files included, which ComfyUI alone does not load). Text-encoder layers are not applied. A LoRA "
                   "whose layer shapes do not match the model (made for another size) is refused, naming them.")
    CATEGORY = SUBCATEGORY
    FUNCTION = "apply"
    OUTPUT_NODE = False
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA patched in (lazily, as ComfyUI does).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to patch."}),
                "lora": (LORA_TYPE, {"tooltip": "The LoRA to apply."}),
                "strength": ("FLOAT", {**STRENGTH, "tooltip": "Multiplier of the LoRA's change (1 = as trained)."}),
            }
        }

    def apply(self, model, lora, strength):
        arch = model_arch(model)
        family = {"flux-dev": "flux", "flux-schnell": "flux", "chroma": "flux", "flux": "flux"}
        if "unknown" not in (arch, lora.arch) and (family.get(arch, arch) != family.get(lora.arch, lora.arch)
                                                   or (lora.arch in ("sd15", "sdxl") and lora.arch != arch)):
            raise MismatchError(f"Apply LoRA: {an_arch(lora.arch)} LoRA does not fit this {arch_name(arch)} model; use a LoRA "
                                f"trained for {arch_name(arch)} (Flux and Chroma LoRAs convert with Convert LoRA)")
        if arch == "chroma" and lora.arch == "flux":
            lora, _ = flux_to_chroma(lora)  # the layers Chroma lacks would only log "lora key not loaded"
        unet_only = LoRA(modules={n: m for n, m in lora.modules.items() if n.startswith(keymaps.DIFFUSION)},
                         arch=lora.arch, source_format=lora.source_format, metadata=dict(lora.metadata))
        if strength == 0 or not unet_only.modules:
            return (model,)
        # ComfyUI only logs a layer whose shape does not match and patches nothing there: refuse first
        weights = PatcherSource(model)
        check_lora_fits(unet_only, {k: weights.info(k).shape for k in weights.keys()}, f"this {arch} model")
        try:
            sd = lora_state_dict(unet_only, "comfy")
        except MismatchError:  # adapters on split q/k/v slices: only the split naming carries them
            sd = lora_state_dict(unet_only, "lycoris")
        patched, _ = comfy.sd.load_lora_for_models(model, None, sd, strength, 0)
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "WeightsmithLoadLoRA": WeightsmithLoadLoRA,
    "WeightsmithSaveLoRA": WeightsmithSaveLoRA,
    "WeightsmithConvertLoRA": WeightsmithConvertLoRA,
    "WeightsmithFluxToChroma": WeightsmithFluxToChroma,
    "WeightsmithApplyLoRA": WeightsmithApplyLoRA,
    "WeightsmithReprojectFluxToChroma": WeightsmithReprojectFluxToChroma,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WeightsmithLoadLoRA": "Read LoRA File (Weightsmith)",  # not "Load LoRA": that is core LoraLoader's name
    "WeightsmithSaveLoRA": "Save LoRA (Weightsmith)",
    "WeightsmithConvertLoRA": "Convert LoRA (Weightsmith)",
    "WeightsmithFluxToChroma": "Flux LoRA to Chroma (Weightsmith)",
    "WeightsmithApplyLoRA": "Apply LoRA (Weightsmith)",
    "WeightsmithReprojectFluxToChroma": "Flux LoRA to Chroma, re-project (Weightsmith)",
}
