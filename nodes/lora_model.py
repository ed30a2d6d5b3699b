"""Bridges to ComfyUI's own LoRA type `LORA_MODEL` (Train LoRA's output; Load LoRA Model and Save LoRA Weights
take it, comfy_extras/nodes_train.py): a plain state dict of LoRA tensors in ComfyUI's naming. Thin: the
state dict goes through `core.lora.formats` both ways, so every module is kept or refused by name."""

from __future__ import annotations

from ..core.errors import MismatchError
from ..core.lora.formats import LORA_ARCHES, load_lora, lora_state_dict, lora_summary
from .common import CATEGORY, LORA_TYPE, ui_report

LORA_MODEL_TYPE = "LORA_MODEL"  # ComfyUI's socket type: dict[str, torch.Tensor] of a LoRA in its own names
SUBCATEGORY = f"{CATEGORY}/LoRA"


def _summary_text(title: str, lora) -> tuple[str, dict]:
    s = lora_summary(lora)
    text = (f"{title}: {s['arch']} LoRA, {s['modules']} modules ({s['lowrank_modules']} low-rank, rank "
            f"{s['rank_min']}..{s['rank_max']}; {s['diff_modules']} full diffs, {s['bias_modules']} bias diffs)")
    return text, s


class WeightsmithLoRAFromLoraModel:
    DESCRIPTION = ("Use a LoRA made by ComfyUI's Train LoRA (its LORA_MODEL output) with the Weightsmith LoRA nodes "
                   "(Compose, Re-rank, Convert, Validate, Bake, Save LoRA). Every module is read; keys that are not "
                   "understood are listed, never dropped silently.")
    CATEGORY = SUBCATEGORY
    FUNCTION = "convert"
    OUTPUT_NODE = False
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The LoRA as the Weightsmith nodes take it.", "Architecture, modules and ranks, as text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_model": (LORA_MODEL_TYPE, {"tooltip": "A LORA_MODEL, e.g. from Train LoRA."}),
            "arch": (["auto", *LORA_ARCHES], {"default": "auto",
                                              "tooltip": "The model family; auto detects it from the layer names."}),
        }}

    def convert(self, lora_model, arch):
        lora = load_lora(dict(lora_model), arch=None if arch == "auto" else arch)
        text, data = _summary_text("from LORA_MODEL", lora)
        if lora.unknown_keys:
            text += f"\n{len(lora.unknown_keys)} keys not understood: " + ", ".join(lora.unknown_keys[:6])
        return {"ui": ui_report(text, data), "result": (lora, text)}


class WeightsmithLoRAToLoraModel:
    DESCRIPTION = ("Hand a Weightsmith LoRA (extracted, composed, converted …) to ComfyUI's own LoRA nodes that take "
                   "a LORA_MODEL: Load LoRA Model (applies it to a MODEL) and Save LoRA Weights. The state dict is "
                   "in ComfyUI's own naming; a module that naming cannot hold is refused by name.")
    CATEGORY = SUBCATEGORY
    FUNCTION = "convert"
    OUTPUT_NODE = False
    RETURN_TYPES = (LORA_MODEL_TYPE, "STRING")
    RETURN_NAMES = ("lora_model", "report")
    OUTPUT_TOOLTIPS = ("The LoRA as ComfyUI's LORA_MODEL (a state dict in ComfyUI's names).",
                       "Architecture, modules and ranks, as text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": (LORA_TYPE, {"tooltip": "The LoRA to hand to ComfyUI's LoRA nodes."})}}

    def convert(self, lora):
        if not lora.modules:  # Load LoRA Model would patch nothing and say nothing
            raise MismatchError("LoRA to LORA_MODEL: the LoRA has no modules (nothing to apply); connect a LoRA "
                                "that changes the model")
        sd = lora_state_dict(lora, "comfy")  # every module, or an error naming those comfy naming cannot hold
        text, data = _summary_text("to LORA_MODEL", lora)
        text += f"\n{len(sd)} tensors in ComfyUI's naming"
        return {"ui": ui_report(text, data), "result": (sd, text)}


NODE_CLASS_MAPPINGS = {
    "WeightsmithLoRAFromLoraModel": WeightsmithLoRAFromLoraModel,
    "WeightsmithLoRAToLoraModel": WeightsmithLoRAToLoraModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WeightsmithLoRAFromLoraModel": "LoRA from LORA_MODEL (Weightsmith)",
    "WeightsmithLoRAToLoraModel": "LoRA to LORA_MODEL (Weightsmith)",
}
