"""Bake LoRAs into a model file: a model file + up to 4 LORA sockets -> a new file, streamed key by key.
Thin: widgets -> `core.bake` (plan from headers, then key by key with progress and interrupt)."""

from __future__ import annotations

from ..core.bake import execute_bake, plan_bake
from ..core.bake.execute import PLAIN_DTYPES
from ..core.bake.plan import parse_strength_rules
from ..core.errors import WeightsmithError
from .common import (
    CATEGORY,
    LORA_TYPE,
    MODEL_FILE_TOOLTIP,
    MODEL_OUTPUT_FOLDER_TOOLTIP,
    MODEL_OUTPUT_FOLDERS,
    STRENGTH,
    compute_device,
    model_file_choices,
    output_path,
    progress,
    resolve_model_file,
    ui_report,
)

MAX_LORAS = 4
RULES_TOOLTIP = ("Per-block strength factors, one PATTERN=FACTOR per line, first match wins: PATTERN a regex searched "
                 "in key names like single_blocks.3.linear1.weight, or a group (@double @single @img @txt @in @mid "
                 "@out @double.3 …); FACTOR multiplies every LoRA's strength there (e.g. @single=0.5). # comments.")


class WeightsmithBakeLoRAs:
    DESCRIPTION = (
        "Bake up to 4 LoRAs (from Read LoRA File nodes: any format, LoRA/LoKr/LoHa/DoRA/full diffs) into a model file "
        "and save it as a new file, streamed tensor by tensor: memory stays near one tensor whatever the model "
        "size. The weights equal what a chain of LoraLoaderModelOnly nodes patches (same order, fp32 math), cast "
        "once. A full checkpoint's text encoders get the LoRAs' text-encoder parts. LoRA modules that match "
        "nothing are listed in the report; a LoRA of another architecture is refused before any work. Interrupt "
        "leaves no partial file."
    )
    CATEGORY = f"{CATEGORY}/LoRA"
    FUNCTION = "bake"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "report")
    OUTPUT_TOOLTIPS = ("full path of the written file", "the report: LoRAs, matched/unmatched modules, rules, keys")

    @classmethod
    def VALIDATE_INPUTS(cls, rules=None):
        """A strength rule that does not parse is refused when the prompt is queued, before anything runs."""
        try:
            parse_strength_rules(rules if isinstance(rules, str) else None)
        except WeightsmithError as e:
            return str(e)
        return True

    @classmethod
    def INPUT_TYPES(cls):
        optional = {}
        for i in range(2, MAX_LORAS + 1):
            optional[f"lora_{i}"] = (LORA_TYPE, {"tooltip": f"LoRA {i}, applied after LoRA {i - 1}."})
            optional[f"strength_{i}"] = ("FLOAT", {**STRENGTH, "tooltip": f"Strength of LoRA {i}."})
        return {
            "required": {
                "model": (model_file_choices(), {"tooltip": f"The model file ({MODEL_FILE_TOOLTIP})."}),
                "lora_1": (LORA_TYPE, {"tooltip": "The first LoRA (from Read LoRA File (Weightsmith))."}),
                "strength_1": ("FLOAT", {**STRENGTH,
                                         "tooltip": "Strength of LoRA 1 (as LoraLoaderModelOnly's strength_model)."}),
                "rules": ("STRING", {"default": "", "multiline": True, "tooltip": RULES_TOOLTIP}),
                "dtype": (list(PLAIN_DTYPES), {"default": "keep", "tooltip": "Output dtype of float tensors; keep = "
                                                                              "the model's, per tensor. fp32 math."}),
                "strict": ("BOOLEAN", {"default": False, "tooltip": "Refuse LoRAs with modules that match nothing "
                                                                    "in the model (off: list them in the report)."}),
                "output_folder": (MODEL_OUTPUT_FOLDERS, {"default": "diffusion_models",
                                                         "tooltip": MODEL_OUTPUT_FOLDER_TOOLTIP}),
                "filename_prefix": ("STRING", {"default": "weightsmith/baked",
                                               "tooltip": "File name prefix inside the output folder; a counter is "
                                                          "added and nothing is overwritten."}),
            },
            "optional": optional,
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def bake(self, model, lora_1, strength_1, rules, dtype, strict, output_folder, filename_prefix, unique_id=None,
             **more):
        chain = [(lora_1, strength_1)]
        for i in range(2, MAX_LORAS + 1):
            if more.get(f"lora_{i}") is not None:
                chain.append((more[f"lora_{i}"], more.get(f"strength_{i}", 1.0)))
        plan = plan_bake(resolve_model_file(model), chain, rules, strict=strict)
        largest = max((plan.source.info(k).numel for k in plan.patches), default=0)
        device = compute_device(largest * 4 * 3)
        out = output_path(output_folder, filename_prefix)
        rep = execute_bake(plan, out, dtype, device, progress(len(plan.source), unique_id))
        text = rep.table()
        return {"ui": ui_report(text, rep.to_dict()), "result": (str(out), text)}


NODE_CLASS_MAPPINGS = {"WeightsmithBakeLoRAs": WeightsmithBakeLoRAs}
NODE_DISPLAY_NAME_MAPPINGS = {"WeightsmithBakeLoRAs": "Bake LoRAs into Model File (Weightsmith)"}
