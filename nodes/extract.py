"""Extract a LoRA from two models (loaded MODELs or files) and validate any LoRA against a fine-tune.
Thin: sockets/widgets → `core.lora.extract` / `core.lora.validate`; one layer at a time on ComfyUI's
compute device, progress bar per layer, Interrupt honoured between layers."""

from __future__ import annotations

import torch

from ..core.lora.extract import SAME_AS_RANK, conv_rank_option, extract_lora
from ..core.lora.svd import RANK_MODES
from ..core.lora.validate import MISSING_POLICIES, validate_lora
from ..core.sources import diffusion_view, open_model
from .common import (
    CATEGORY,
    LORA_TYPE,
    MAX_RANK,
    MODEL_FILE_TOOLTIP,
    STRENGTH,
    PatcherSource,
    compute_device,
    image_tensor,
    model_file_choices,
    progress,
    resolve_model_file,
    ui_report,
)

DTYPES = ["bf16", "fp16", "fp32"]
WORKSPACE_FACTOR = 6  # ΔW, both inputs, the residual and the SVD's workspace, in fp32, per layer


def _settings_inputs() -> dict:
    return {
        "rank": ("INT", {"default": 64, "min": 1, "max": MAX_RANK, "step": 1,
                         "tooltip": "Rank of linear layers in 'fixed' mode (the per-layer cap is max_rank in the other modes)."}),
        "conv_rank": ("INT", {"default": SAME_AS_RANK, "min": SAME_AS_RANK, "max": MAX_RANK, "step": 1,
                              "tooltip": "Rank of k×k convolutions (SD UNets): -1 = the same as rank, 0 = leave them "
                                         "out (as the CLI's --conv-rank 0). In energy/error modes it caps them."}),
        "rank_mode": (list(RANK_MODES), {"default": "fixed",
                                         "tooltip": "How each layer's rank is chosen:\n• fixed: rank\n• energy: the "
                                                    "smallest rank keeping 'energy' of the layer's change\n• error: "
                                                    "the smallest rank with relative error <= 'error'\n• full: every "
                                                    "direction (exact, large file)"}),
        "energy": ("FLOAT", {"default": 0.99, "min": 0.5, "max": 1.0, "step": 0.001,
                             "tooltip": "Fraction of each layer's squared change to keep (energy mode)."}),
        "error": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 0.9, "step": 0.001,
                            "tooltip": "Relative Frobenius error allowed per layer (error mode)."}),
        "max_rank": ("INT", {"default": 0, "min": 0, "max": MAX_RANK, "step": 1,
                             "tooltip": "Per-layer rank cap in every mode; 0 = no cap."}),
        "store_diff": ("BOOLEAN", {"default": True,
                                   "tooltip": "Store changes of 1-D weights (norms) and biases as full diffs, "
                                              "so the LoRA reproduces them exactly."}),
        "clamp_quantile": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.9999, "step": 0.0001,
                                     "tooltip": "0 = off (recommended). Otherwise clamp factor entries at this quantile "
                                                "of their magnitudes, as ComfyUI's own extractor does (adds error)."}),
        "dtype": (DTYPES, {"default": "bf16", "tooltip": "dtype of the stored factors; the report measures the error "
                                                          "of the factors as stored."}),
    }


def _missing_input() -> dict:
    return {"missing": (list(MISSING_POLICIES), {
        "default": "auto", "tooltip": "Tensors only one model has: auto skips them between related bases (Flux dev "
                                      "vs schnell: the guidance embedder) and refuses different architectures; skip "
                                      "always uses the shared ones; error refuses any difference. Skipped tensors "
                                      "are listed in the report."})}


def _extract_kwargs(rank, conv_rank, rank_mode, energy, error, max_rank, store_diff, clamp_quantile, dtype,
                    missing="auto") -> dict:
    return {"rank": rank, "conv_rank": conv_rank_option(conv_rank), "rank_mode": rank_mode, "energy": energy, "error": error,
            "max_rank": max_rank or None, "store_diff": store_diff, "clamp_quantile": clamp_quantile or None,
            "dtype": dtype, "missing": missing}


def _outputs(lora, report):
    text = report.text()
    chart = image_tensor(report.chart())
    return {"ui": ui_report(text, report.to_dict()), "result": (lora, text, chart)}


def _largest_layer_bytes(source) -> int:
    return max((source.info(k).numel for k in source.keys()), default=0) * 4


# One output order on every node: the result (model / path / LoRA), then the report, then the chart.
EXTRACT_RETURNS = (LORA_TYPE, "STRING", "IMAGE")
EXTRACT_NAMES = ("lora", "report", "chart")
EXTRACT_TOOLTIPS = (
    "The extracted LoRA (alpha = rank: scale 1). Save it with Save LoRA or apply it with Apply LoRA.",
    "The reconstruction report: coverage, ranks, errors per block.",
    "Relative reconstruction error per block, next to the optimum at the same rank.",
)


class WeightsmithExtractLoRA:
    DESCRIPTION = ("Extract a LoRA from two loaded models: the change tuned − base of every layer, factorised at "
                   "the chosen rank (randomized SVD when the rank is small, exact otherwise), one layer at a time on "
                   "ComfyUI's device. The models' own LoRAs/merges count (their effective weights are used). The "
                   "report gives each block's error next to the best possible at that rank.")
    CATEGORY = f"{CATEGORY}/LoRA"
    FUNCTION = "extract"
    OUTPUT_NODE = False
    RETURN_TYPES = EXTRACT_RETURNS
    RETURN_NAMES = EXTRACT_NAMES
    OUTPUT_TOOLTIPS = EXTRACT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "base": ("MODEL", {"tooltip": "The model the fine-tune started from."}),
                "tuned": ("MODEL", {"tooltip": "The fine-tuned (or merged, or LoRA-patched) model."}),
                **_settings_inputs(),
            },
            "optional": _missing_input(),
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def extract(self, base, tuned, unique_id=None, **settings):
        device = torch.device("cpu")
        probe = PatcherSource(base, device)
        device = compute_device(WORKSPACE_FACTOR * _largest_layer_bytes(probe))
        lora, report = extract_lora(PatcherSource(base, device, "base"), PatcherSource(tuned, device, "tuned"),
                                    device=device, progress=progress(len(probe), unique_id),
                                    **_extract_kwargs(**settings))
        return _outputs(lora, report)


class WeightsmithExtractLoRAFiles:
    DESCRIPTION = ("Extract a LoRA from two model files (diffusion_models, unet or checkpoints) without loading either whole: each "
                   "layer is read (memory-mapped), subtracted and factorised on ComfyUI's device, then freed. "
                   "Checkpoint prefixes do not matter. The report gives each block's error next to the optimum.")
    CATEGORY = f"{CATEGORY}/LoRA"
    FUNCTION = "extract"
    OUTPUT_NODE = False
    RETURN_TYPES = EXTRACT_RETURNS
    RETURN_NAMES = EXTRACT_NAMES
    OUTPUT_TOOLTIPS = EXTRACT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        models = model_file_choices()
        return {
            "required": {
                "base_model": (models, {"tooltip": f"The base model file ({MODEL_FILE_TOOLTIP})."}),
                "tuned_model": (models, {"tooltip": "The fine-tuned model file (same architecture)."}),
                **_settings_inputs(),
            },
            "optional": _missing_input(),
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def extract(self, base_model, tuned_model, unique_id=None, **settings):
        base = open_model(resolve_model_file(base_model))
        tuned = open_model(resolve_model_file(tuned_model))
        view = diffusion_view(base)
        device = compute_device(WORKSPACE_FACTOR * _largest_layer_bytes(view))
        lora, report = extract_lora(base, tuned, device=device, progress=progress(len(view), unique_id),
                                    **_extract_kwargs(**settings))
        return _outputs(lora, report)


class WeightsmithValidateLoRA:
    DESCRIPTION = ("How well a LoRA (from any tool) reproduces a fine-tune: per layer, the relative error of the "
                   "change it applies against tuned − base, the best any LoRA of the same rank could do, and "
                   "coverage (changed layers it misses, modules that target nothing).")
    CATEGORY = f"{CATEGORY}/LoRA"
    FUNCTION = "validate"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "chart")
    OUTPUT_TOOLTIPS = ("The reconstruction report: coverage, ranks, errors per block.",
                       "Relative reconstruction error per block, next to the optimum at the LoRA's rank.")

    @classmethod
    def INPUT_TYPES(cls):
        models = model_file_choices()
        return {
            "required": {
                "base_model": (models, {"tooltip": f"The base model file ({MODEL_FILE_TOOLTIP})."}),
                "tuned_model": (models, {"tooltip": "The fine-tuned model the LoRA should reproduce."}),
                "lora": (LORA_TYPE, {"tooltip": "The LoRA to check (Read LoRA File reads any supported format)."}),
                "strength": ("FLOAT", {**STRENGTH, "tooltip": "Strength the LoRA is applied at."}),
            },
            "optional": _missing_input(),
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def validate(self, base_model, tuned_model, lora, strength, unique_id=None, missing="auto"):
        base = open_model(resolve_model_file(base_model))
        tuned = open_model(resolve_model_file(tuned_model))
        view = diffusion_view(base)
        device = compute_device(WORKSPACE_FACTOR * _largest_layer_bytes(view))
        report = validate_lora(base, tuned, lora, device=device, strength=strength,
                               progress=progress(len(view), unique_id), missing=missing)
        text = report.text()
        return {"ui": ui_report(text, report.to_dict()), "result": (text, image_tensor(report.chart()))}


NODE_CLASS_MAPPINGS = {
    "WeightsmithExtractLoRA": WeightsmithExtractLoRA,
    "WeightsmithExtractLoRAFiles": WeightsmithExtractLoRAFiles,
    "WeightsmithValidateLoRA": WeightsmithValidateLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WeightsmithExtractLoRA": "Extract LoRA (Weightsmith)",
    "WeightsmithExtractLoRAFiles": "Extract LoRA from Files (Weightsmith)",
    "WeightsmithValidateLoRA": "Validate LoRA (Weightsmith)",
}
