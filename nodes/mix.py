"""Lossless mix nodes: in-graph on MODELs (lazy ModelPatcher patches) and file to file (streaming)."""

from __future__ import annotations

import torch
from comfy.weight_adapter import WeightAdapterBase

from ..core.dtypes import MODEL_OUTPUT_CHOICES
from ..core.errors import BadFileError, MismatchError
from ..core.estimate_work import mix_estimate
from ..core.mix import check_same_architecture, execute_mix, lossless_mix, pick_among, plan_mix
from ..core.mix_report import sampled_tie_warning
from ..core.sources import as_source
from .common import (
    CATEGORY,
    DIFFUSION_PREFIX,
    MODEL_FILE_TOOLTIP,
    MODEL_OUTPUT_FOLDER_TOOLTIP,
    MODEL_OUTPUT_FOLDERS,
    PatcherSource,
    compute_device,
    effective_weight,
    image_tensor,
    model_arch,
    model_file_choices,
    output_path,
    progress,
    resolve_model_file,
    ui_report,
)
from .graph_names import input_names

MODES = {"min_diff (nearest)": "min", "max_diff (farthest)": "max"}


class LosslessMixAdapter(WeightAdapterBase):
    """A patch that replaces the weight (the reference a's effective weight at this point of the patch
    list) by the lossless mix of it with the candidates, computed lazily per key when ComfyUI patches
    the weight: nothing is materialised before that. `weights` = (config, entries_b, entries_c, …) where
    config is a float64 tensor [1 for max else 0, scale_b, scale_c, …] and entries_x the candidate's
    `get_key_patches` list for this key (its original tensor plus its own patches)."""

    name = "weightsmith_lossless_mix"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        config = self.weights[0].tolist()
        mode = "max" if config[0] else "min"
        dtype = weight.dtype if weight.dtype.is_floating_point else intermediate_dtype
        candidates = [effective_weight(e, weight.device, key, dtype) for e in self.weights[1:]]
        mixed = pick_among(weight, candidates, config[1:], mode, out_dtype=weight.dtype)
        if strength != 1.0:  # partial application: move from the reference towards the mix
            mixed = weight + strength * (mixed - weight)
        weight.copy_(mixed)
        return weight


class WeightsmithLosslessMix:
    DESCRIPTION = (
        "Lossless mix of three models: per weight element, keep the element of model_b or model_c that is nearest "
        "to (min_diff) or farthest from (max_diff) the reference model_a, comparing |a - alpha*b| with |a - beta*c| "
        "(ties take b for min_diff, c for max_diff). alpha/beta only bias the comparison. Applied lazily as "
        "patches on a clone of model_a (no extra copy of the model). Recipe: ModelMergeSimple(a, b) as model_a, "
        "then a and b as model_b and model_c, with beta 0.9 (alpha = beta: that reference ties in every element "
        "and the result is just model_b; the report warns whenever ties decide)."
    )
    CATEGORY = f"{CATEGORY}/Mix"
    FUNCTION = "mix"
    OUTPUT_NODE = False
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "report", "chart")
    OUTPUT_TOOLTIPS = (
        "model_a with every mixable weight replaced by the element-wise pick from model_b / model_c",
        "the report as text: similarity of b and c to a, share of elements taken from each, keys kept from a",
        "chart: per block, cosine similarity of b and c to a and the share of elements taken from each",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_a": ("MODEL", {"tooltip": "The reference: each element is compared against it. Its keys, "
                                                 "and its weights where b or c cannot be mixed, make the output."}),
                "model_b": ("MODEL", {"tooltip": "First candidate: elements come from here where it wins."}),
                "model_c": ("MODEL", {"tooltip": "Second candidate: elements come from here where it wins."}),
                "alpha": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                    "tooltip": "Scale of b in the comparison |a - alpha*b| (e.g. 0.95 when b sits "
                                               "in a slightly different range). The value written is unscaled."}),
                "beta": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Scale of c in the comparison |a - beta*c|. The value written is "
                                              "unscaled."}),
                "mode": (list(MODES), {"default": "min_diff (nearest)",
                                       "tooltip": "min_diff: take the candidate nearest to a (ties: b). max_diff: "
                                                  "take the farthest (ties: c)."}),
                "report": ("BOOLEAN", {"default": True,
                                       "tooltip": "Compute the similarity report and chart now (one pass over the "
                                                  "three models on the compute device). Off: only the plan."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    def mix(self, model_a, model_b, model_c, alpha, beta, mode, report=True, unique_id=None, prompt=None):
        mode = MODES[mode]
        check_same_architecture([(n, model_arch(m)) for m, n in ((model_a, "model_a"), (model_b, "model_b"),
                                                                 (model_c, "model_c"))])
        device = compute_device(1 << 30)  # the report pass holds three fp32 copies of one weight at a time
        names = input_names(prompt, unique_id, ["model_a", "model_b", "model_c"])  # what the report calls them
        sources = [PatcherSource(m, device, name=n) for m, n in zip((model_a, model_b, model_c), names)]
        # Compare in fp32 whatever the in-memory dtypes are: the patch runs on fp32 weights too.
        plan = plan_mix(sources[0], sources[1:], include=("unet",), out_dtype=torch.float32)
        if not plan.mixed():
            raise MismatchError("nothing to mix: model_b and model_c share no same-shaped diffusion-model weight "
                                "with model_a; connect three models of one architecture")
        kp_b = model_b.get_key_patches(DIFFUSION_PREFIX)
        kp_c = model_c.get_key_patches(DIFFUSION_PREFIX)
        config = torch.tensor([1.0 if mode == "max" else 0.0, alpha, beta], dtype=torch.float64)
        patches = {}
        for k in plan.mixed():
            full = DIFFUSION_PREFIX + k.key
            entries = (kp_b[DIFFUSION_PREFIX + k.sources[0]], kp_c[DIFFUSION_PREFIX + k.sources[1]])
            patches[full] = LosslessMixAdapter({full}, (config, *entries))
        mixed = model_a.clone()
        mixed.add_patches(patches, 1.0, 1.0)
        rep = execute_mix(plan, sources[0], sources[1:], [alpha, beta], mode, dry_run=True, device=device,
                          progress=progress(len(plan.mixed()), unique_id), stats=bool(report))
        rep.out = None
        if not report:  # no statistics of its own: the ties are checked on a sample
            rep.tie_warning = sampled_tie_warning(sources[0], sources[1:], [alpha, beta], mode, device=device)
        text = rep.text().replace("dry run: nothing written", "patched lazily (nothing written)")
        return {"ui": ui_report(text, rep.to_json()), "result": (mixed, text, image_tensor(rep.chart()))}


class WeightsmithLosslessMixFiles:
    DESCRIPTION = (
        "Lossless mix of three model files, streamed tensor by tensor into a new safetensors file (memory stays "
        "near one tensor): per element, the element of model_b or model_c nearest to (min_diff) or farthest from "
        "(max_diff) the reference model_a. Full checkpoints and bare diffusion-model files both work; text "
        "encoders and VAE are copied from model_a unless enabled. Keys missing from b or c, and tensors whose "
        "shapes differ, keep model_a's values and are listed in the report. Dry run: report only, no file."
    )
    CATEGORY = f"{CATEGORY}/Mix"
    FUNCTION = "mix"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("path", "report", "chart")
    OUTPUT_TOOLTIPS = (
        "full path of the written file (empty on a dry run)",
        "the report as text: similarity of b and c to a, share of elements taken from each, keys kept from a",
        "chart: per block, cosine similarity of b and c to a and the share of elements taken from each",
    )

    @classmethod
    def INPUT_TYPES(cls):
        files = model_file_choices()
        return {
            "required": {
                "model_a": (files, {"tooltip": f"The reference file ({MODEL_FILE_TOOLTIP}): each element is "
                                               "compared against it; its keys and layout make the output."}),
                "model_b": (files, {"tooltip": "First candidate file: elements come from here where it wins."}),
                "model_c": (files, {"tooltip": "Second candidate file: elements come from here where it wins."}),
                "alpha": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                    "tooltip": "Scale of b in the comparison |a - alpha*b|; the value written is "
                                               "unscaled."}),
                "beta": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Scale of c in the comparison |a - beta*c|; the value written is "
                                              "unscaled."}),
                "mode": (list(MODES), {"default": "min_diff (nearest)",
                                       "tooltip": "min_diff: take the candidate nearest to a (ties: b). max_diff: "
                                                  "take the farthest (ties: c)."}),
                "mix_diffusion_model": ("BOOLEAN", {"default": True,
                                                    "tooltip": "Mix the diffusion model (UNet / DiT) weights."}),
                "mix_text_encoders": ("BOOLEAN", {"default": False,
                                                  "tooltip": "Also mix text-encoder weights of full checkpoints "
                                                             "(off: copied from model_a)."}),
                "mix_vae": ("BOOLEAN", {"default": False,
                                        "tooltip": "Also mix VAE weights of full checkpoints (off: copied from "
                                                   "model_a)."}),
                "dry_run": ("BOOLEAN", {"default": False,
                                        "tooltip": "Only analyse and report; write no file."}),
                "output_folder": (MODEL_OUTPUT_FOLDERS, {"default": "diffusion_models",
                                                         "tooltip": MODEL_OUTPUT_FOLDER_TOOLTIP}),
                "filename_prefix": ("STRING", {"default": "weightsmith/lossless_mix",
                                               "tooltip": "File name prefix inside the output folder; a counter "
                                                          "is added and nothing is overwritten."}),
            },
            "optional": {
                "dtype": (MODEL_OUTPUT_CHOICES, {
                    "default": "keep",
                    "tooltip": "Output dtype. keep: each mixed tensor in the dtype holding every candidate's value "
                               "exactly, and weights model_a stores as ComfyUI scaled fp8 / mixed precision in that "
                               "encoding again (a fresh scale over the picked values: each element is then its "
                               "model's value within fp8 rounding). fp8_scaled: ComfyUI scaled fp8 for the "
                               "diffusion model's Linear weights."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def mix(self, model_a, model_b, model_c, alpha, beta, mode, mix_diffusion_model, mix_text_encoders, mix_vae,
            dry_run, output_folder, filename_prefix, dtype="keep", unique_id=None):
        include = [g for g, on in (("unet", mix_diffusion_model), ("te", mix_text_encoders), ("vae", mix_vae)) if on]
        if not include:
            raise BadFileError("nothing to mix: enable at least one of mix_diffusion_model, mix_text_encoders, mix_vae")
        paths = [resolve_model_file(m) for m in (model_a, model_b, model_c)]
        out = None if dry_run else output_path(output_folder, filename_prefix)
        device = compute_device(1 << 30)
        sources = [as_source(p) for p in paths]
        est = mix_estimate(plan_mix(sources[0], sources[1:], include), sources, out, device, dtype)
        est.check_disk()  # before any work: the output does not fit
        # a real run computes no statistics: its ties are checked on a sample (a dry run has them all)
        sampled = "" if dry_run else sampled_tie_warning(paths[0], paths[1:], [alpha, beta], MODES[mode], include,
                                                         device)
        rep = lossless_mix(paths[0], paths[1], paths[2], alpha=alpha, beta=beta, mode=MODES[mode], out=out,
                           include=include, dry_run=dry_run, device=device, out_dtype=dtype,
                           progress=progress(1, unique_id))
        rep.tie_warning = rep.tie_warning or sampled
        text = est.text() + "\n" + rep.text()
        return {"ui": ui_report(text, rep.to_json()),
                "result": ("" if out is None else str(out), text, image_tensor(rep.chart()))}


NODE_CLASS_MAPPINGS = {
    "WeightsmithLosslessMix": WeightsmithLosslessMix,
    "WeightsmithLosslessMixFiles": WeightsmithLosslessMixFiles,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WeightsmithLosslessMix": "Lossless Mix (Weightsmith)",
    "WeightsmithLosslessMixFiles": "Lossless Mix Files (Weightsmith)",
}
