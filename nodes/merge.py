"""Merge nodes: in-graph on MODELs (lazy ModelPatcher patches) and file to file (streaming)."""

from __future__ import annotations

import torch
from comfy.weight_adapter import WeightAdapterBase

from ..core.dtypes import MODEL_OUTPUT_CHOICES
from ..core.encodings.gguf_write import GGUF_OUTPUT_TYPES
from ..core.errors import WeightsmithError
from ..core.estimate_work import merge_estimate
from ..core.merge.execute import execute_merge, kept_gguf_type
from ..core.merge.methods import METHODS, derive_seed, format_params
from ..core.merge.plan import MISSING_POLICIES, OTHERS_POLICIES, MergePlan, plan_merge
from ..core.merge.rules import PRESETS, InputCountError, InputNames, parse_params, parse_rules, parse_weights
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
    model_file_choices,
    output_path,
    progress,
    resolve_model_file,
    ui_report,
)

NONE = "none"
SOCKETS = ("model_a", "model_b", "model_c", "model_d")


def plan_for_sockets(connected: list[str], files: bool, *args, **kwargs) -> MergePlan:
    """`plan_merge` of the connected (or chosen) inputs, whose errors about a missing or extra input name the
    node's sockets (`connect a model to model_c`) instead of the CLI's letters."""
    try:
        return plan_merge(*args, **kwargs)
    except InputCountError as e:
        order = list(connected) + [s for s in SOCKETS if s not in connected]  # missing ones: the free sockets
        name = lambda i: order[i] if i < len(order) else f"input {i + 1}"  # noqa: E731
        names = (InputNames(name, "chosen", "choose a model file in", "set to none") if files
                 else InputNames(name, "connected", "connect a model to", "disconnect"))
        raise e.renamed(names) from None


DEFAULT_RATIO = 0.5

# One short line per method (the tooltip shows them one under the other); parameters are in params' tooltip.
METHODS_TOOLTIP = "Merge method:\n" + "\n".join(
    f"• {m.name} ({m.inputs_text()} models): {m.description.split('. ')[0].rstrip('.')}" for m in METHODS.values())
WEIGHTS_TOOLTIP = ("One weight per connected model, comma-separated (e.g. 0.7,0.3). Empty: ratio for two models, "
                   "else the method's default (equal weights for weighted_sum/slerp; 1 each for ties/dare).")
RATIO_TOOLTIP = ("model_a's share in a two-model weighted_sum or slerp, as ModelMergeSimple's ratio: 1 = model_a, "
                 "0 = model_b. Used when weights is empty; a primitive can drive it.")


def validate_texts(weights=None, rules=None, params=None):
    """ComfyUI's VALIDATE_INPUTS for the text widgets: a rule, weight list or parameter that does not parse is
    refused when the prompt is queued (node_errors, nothing runs), not half-way through a run. Linked values are
    not known yet (None here) and are checked when the node runs."""
    try:
        if isinstance(weights, str) and weights.strip():
            parse_weights(weights)
        if isinstance(rules, str):
            parse_rules(rules)
        if isinstance(params, str) and params.strip():
            parse_params(params, "parameters")
    except WeightsmithError as e:
        return str(e)
    return True


def ratio_weights(ratio: float, weights: str, method: str, n_models: int) -> str | None:
    """The weights string a merge uses: the typed `weights`, else (ratio, 1 - ratio) for a two-model weighted sum
    or slerp, else None (the method's default). A ratio that would be ignored is refused, never dropped."""
    if not 0.0 <= ratio <= 1.0:  # a linked value is not range-checked by ComfyUI's validation
        raise WeightsmithError(f"ratio {ratio:g}: give model_a's share between 0 and 1 (ModelMergeSimple's range)")
    if weights.strip():
        if ratio != DEFAULT_RATIO:
            raise WeightsmithError(f"ratio {ratio:g} and weights {weights.strip()!r} both set: clear weights to use "
                                   f"ratio, or set ratio back to {DEFAULT_RATIO:g}")
        return weights
    if ratio == DEFAULT_RATIO:
        return None
    if n_models != 2 or METHODS[method].weights != "normalized":
        raise WeightsmithError(f"ratio is model_a's share in a two-model weighted_sum or slerp; with {n_models} "
                               f"models and method {method} give weights instead (one per model)")
    return f"{ratio!r},{1.0 - ratio!r}"
RULES_TOOLTIP = ("Per-key rules, one REGEX=ACTION per line, first match wins (separately for method and weights). "
                 "REGEX is searched in names like double_blocks.0.img_attn.qkv.weight, or a group: @double @single "
                 "@img @txt @guidance @time @vector @embedders @in @mid @out @double.3 @in.4 … ACTION: a method "
                 "(ties(density=0.3)), take:A / take:2 / take:first, drop, or weight:0.7,0.3. # starts a comment.")
PARAMS_TOOLTIP = ("Method parameters as NAME=VALUE, comma-separated, e.g. density=0.3, seed=7, base=A. "
                  "Unknown names are an error. Defaults:\n" + "\n".join(
                      f"• {m.name}: {format_params(m.defaults)}" for m in METHODS.values() if m.defaults))
PRESET_TOOLTIP = "Named rule set, applied after your own rules:\n" + "\n".join(
    f"• {k}: {d}" for k, (d, _) in PRESETS.items())


class MergeAdapter(WeightAdapterBase):
    """A patch that replaces the weight (model_a's effective weight at this point of the patch list) by
    the merge of it with the other models' effective weights, computed lazily per key when ComfyUI
    patches the weight: nothing is materialised before. `weights` = (config, entries_b, entries_c, …):
    config is (method name, params, merge weights, key name) and entries_x the other model's
    get_key_patches list for this key (its original tensor plus its own patches). The math is the core
    method on fp32, so it equals the file merge. In lowvram mode ComfyUI re-runs it at every forward."""

    name = "weightsmith_merge"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        with torch.no_grad():
            return self._merge(weight, key, strength)

    def _merge(self, weight, key, strength):
        method_name, params, merge_weights, name = self.weights[0]
        method = METHODS[method_name]
        params = dict(params)
        if method.random:
            params["seed"] = derive_seed(params.get("seed", 0), name)
        xs = [weight.float()] + [effective_weight(e, weight.device, key) for e in self.weights[1:]]
        merged = method.fn(xs, list(merge_weights), **params)
        if strength != 1.0:  # partial application: move from model_a towards the merge
            merged = xs[0] + strength * (merged - xs[0])
        weight.copy_(merged.to(weight.dtype))
        return weight


def build_patches(plan: MergePlan, models: list) -> tuple[object, list[str]]:
    """A clone of models[0] with one lazy patch per merged/taken key, and notes on keys it cannot hold.
    Weighted sums use ComfyUI's nested key patches (as ModelMergeSimple does); other methods a MergeAdapter."""
    merged = models[0].clone()
    kps = [m.get_key_patches(DIFFUSION_PREFIX) for m in models]
    own = kps[0]
    notes, skipped, dropped = [], [], []
    for kp in plan.keys:
        full = DIFFUSION_PREFIX + kp.name
        if full not in own:
            if kp.action != "drop":
                skipped.append(kp.name)
            continue
        if kp.action == "drop":
            dropped.append(kp.name)
            continue
        if kp.action == "take":
            i = kp.reads[0][0]
            if i != 0:  # weight = 0·A + X_i: model i's effective weight, lazily
                merged.add_patches({full: kps[i][DIFFUSION_PREFIX + kp.reads[0][1]]}, 1.0, 0.0)
            continue
        others = [kps[i][DIFFUSION_PREFIX + raw] for i, raw in kp.reads[1:]]
        if kp.method == "weighted_sum":
            w = list(kp.weights)
            total = sum(w)
            if kp.params.get("normalize", True) and total != 0:
                w = [x / total for x in w]
            # ComfyUI evaluates this as (A·w0 + X1·w1) + X2·w2 …: the order weighted_sum uses too
            merged.add_patches({full: others[0]}, w[1], w[0])
            for entries, wi in zip(others[1:], w[2:]):
                merged.add_patches({full: entries}, wi, 1.0)
        else:
            config = (kp.method, dict(kp.params), tuple(kp.weights), kp.name)
            merged.add_patches({full: MergeAdapter({full}, (config, *others))}, 1.0, 1.0)
    if skipped:
        notes.append(f"{len(skipped)} keys are not in model_a and cannot be added to it in-graph "
                     f"(e.g. {', '.join(skipped[:3])}); use the file merge to include them")
    if dropped:
        notes.append(f"{len(dropped)} keys a rule drops keep model_a's weight in-graph (a MODEL keeps model_a's "
                     f"structure; e.g. {', '.join(dropped[:3])}); use the file merge to leave them out")
    return merged, notes


class WeightsmithMergeModels:
    DESCRIPTION = (
        "Merge 2 to 4 MODELs in the graph with any method (weighted sum, add difference, TIES, DARE, SLERP, …) and "
        "per-key rules. Built on ModelPatcher patches of a clone of model_a, computed lazily when ComfyUI loads the "
        "model: no extra copy of the model is made. The output keeps model_a's structure. Weighted sums are "
        "ComfyUI's own nested patches; other methods are recomputed per weight whenever ComfyUI patches the model "
        "(in lowvram mode at every step: for TIES/DARE on big models prefer Merge Model Files). The report "
        "(similarity of the inputs and change per block) runs the merge once on the compute device when enabled."
    )
    CATEGORY = f"{CATEGORY}/Merge"
    FUNCTION = "merge"
    OUTPUT_NODE = False
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "report", "chart")
    OUTPUT_TOOLTIPS = (
        "model_a with every merged weight patched lazily",
        "the report as text: plan, rules and what they matched, per-block similarity and change",
        "chart: per block, 1 - cosine similarity of each input to model_a and the relative change of model_a",
    )

    @classmethod
    def VALIDATE_INPUTS(cls, weights=None, rules=None, params=None):
        return validate_texts(weights, rules, params)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_a": ("MODEL", {"tooltip": "Model A: the output keeps its structure; the default base of "
                                                 "TIES/DARE/add_dissimilar."}),
                "model_b": ("MODEL", {"tooltip": "Model B."}),
                "method": (list(METHODS), {"default": "weighted_sum", "tooltip": METHODS_TOOLTIP}),
                "ratio": ("FLOAT", {"default": DEFAULT_RATIO, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": RATIO_TOOLTIP}),
                "weights": ("STRING", {"default": "", "tooltip": WEIGHTS_TOOLTIP}),
                "rules": ("STRING", {"default": "", "multiline": True, "tooltip": RULES_TOOLTIP}),
                "params": ("STRING", {"default": "", "tooltip": PARAMS_TOOLTIP}),
                "preset": ([NONE] + list(PRESETS), {"default": NONE, "tooltip": PRESET_TOOLTIP}),
                "missing": (["take", "error"], {"default": "take",
                                                "tooltip": "Keys not in every model: take (from model_a when it has "
                                                           "them) or error."}),
                "report": ("BOOLEAN", {"default": True,
                                       "tooltip": "Compute the similarity report and chart now (one pass over the "
                                                  "models on the compute device). Off: only the plan."}),
            },
            "optional": {
                "model_c": ("MODEL", {"tooltip": "Model C (add_difference/train_difference: A + (B - C))."}),
                "model_d": ("MODEL", {"tooltip": "Model D (e.g. the base of add_dissimilar with base=D)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def merge(self, model_a, model_b, method, weights, rules, params, preset, missing, report=True, model_c=None,
              model_d=None, unique_id=None, ratio=DEFAULT_RATIO):
        models = [m for m in (model_a, model_b, model_c, model_d) if m is not None]
        weights = ratio_weights(ratio, weights, method, len(models))
        device = compute_device()
        sources = [PatcherSource(m, device, name=f"model_{'abcd'[i]}") for i, m in enumerate(models)]
        connected = [n for n, m in zip(SOCKETS, (model_a, model_b, model_c, model_d)) if m is not None]
        plan = plan_for_sockets(connected, False, sources, method, weights, rules, missing, params, [preset],
                                others="drop")
        merged, notes = build_patches(plan, models)
        plan.notes.extend(notes)
        if report:
            rep = execute_merge(plan, None, device=device, progress=progress(len(plan.keys), unique_id))
            text = rep.table().replace("dry run: nothing written", "patched lazily (nothing written)")
            data, chart = rep.to_dict(), rep.chart()
        else:
            text, data = plan.describe(), {"plan": plan.summary()}
            chart = _plan_chart(plan)
        return {"ui": ui_report(text, data), "result": (merged, text, image_tensor(chart))}


def _plan_chart(plan: MergePlan):
    from ..core.report import bar_chart

    groups: dict[str, dict[str, float]] = {}
    for kp in plan.keys:
        g = groups.setdefault(kp.group, {"merge": 0.0, "take": 0.0, "drop": 0.0})
        g[kp.action] += kp.numel / 1e6
    labels = list(groups)
    series = {f"{a} (M params)": [groups[g][a] for g in labels] for a in ("merge", "take", "drop")}
    return bar_chart(labels, series, title=f"merge plan: {plan.method}, parameters per block", ylabel="M params")


class WeightsmithMergeFiles:
    DESCRIPTION = (
        "Merge 2 to 4 model files into a new safetensors file, streamed tensor by tensor (memory stays near one "
        "tensor, whatever the model size): fp32 math on the compute device, one cast at the end. Keys are matched "
        "by name across layouts; per-key rules and presets decide methods, weights, takes and drops (e.g. keep the "
        "guidance embedder of Flux dev when merging with schnell). Interrupt leaves no partial file."
    )
    CATEGORY = f"{CATEGORY}/Merge"
    FUNCTION = "merge"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("path", "report", "chart")
    OUTPUT_TOOLTIPS = (
        "full path of the written file (empty on a dry run)",
        "the report as text: plan, rules and what they matched, keys only in some models, per-block similarity "
        "and change",
        "chart: per block, 1 - cosine similarity of each input to model_a and the relative change of model_a",
    )

    @classmethod
    def VALIDATE_INPUTS(cls, weights=None, rules=None, params=None):
        return validate_texts(weights, rules, params)

    @classmethod
    def INPUT_TYPES(cls):
        files = model_file_choices()
        optional = [NONE] + files
        return {
            "required": {
                "model_a": (files, {"tooltip": f"Model A ({MODEL_FILE_TOOLTIP}): the output keeps its key prefix; "
                                               "the default base of TIES/DARE/add_dissimilar."}),
                "model_b": (files, {"tooltip": "Model B."}),
                "method": (list(METHODS), {"default": "weighted_sum", "tooltip": METHODS_TOOLTIP}),
                "ratio": ("FLOAT", {"default": DEFAULT_RATIO, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": RATIO_TOOLTIP}),
                "weights": ("STRING", {"default": "", "tooltip": WEIGHTS_TOOLTIP}),
                "rules": ("STRING", {"default": "", "multiline": True, "tooltip": RULES_TOOLTIP}),
                "params": ("STRING", {"default": "", "tooltip": PARAMS_TOOLTIP}),
                "preset": ([NONE] + list(PRESETS), {"default": NONE, "tooltip": PRESET_TOOLTIP}),
                "missing": (list(MISSING_POLICIES), {"default": "take",
                                                     "tooltip": "Keys not in every model: take (from the first model "
                                                                "that has them), drop, or error. All are listed in "
                                                                "the report."}),
                "other_keys": (list(OTHERS_POLICIES), {"default": "copy",
                                                       "tooltip": "Keys outside the diffusion model (text encoders, "
                                                                  "VAE of full checkpoints): copy from model_a, "
                                                                  "merge like the rest, or drop."}),
                "dtype": (MODEL_OUTPUT_CHOICES + list(GGUF_OUTPUT_TYPES),
                          {"default": "keep",
                           "tooltip": "Output dtype; keep = model_a's dtype per tensor, and model_a's ComfyUI "
                                      "scaled-fp8 / mixed-precision encoding with scales recomputed from the merged "
                                      "weights. fp8_scaled: ComfyUI scaled fp8 for the diffusion model's Linear "
                                      "weights. The math is fp32 either way. gguf-… writes a .gguf of the diffusion "
                                      "model for ComfyUI-GGUF's Unet loader (Q8_0/Q5/Q4 quantized by the gguf "
                                      "package; set other_keys to drop for full checkpoints)."}),
                "dry_run": ("BOOLEAN", {"default": False, "tooltip": "Compute the merge and report; write no file."}),
                "output_folder": (MODEL_OUTPUT_FOLDERS, {"default": "diffusion_models",
                                                         "tooltip": MODEL_OUTPUT_FOLDER_TOOLTIP}),
                "filename_prefix": ("STRING", {"default": "weightsmith/merged",
                                               "tooltip": "File name prefix inside the output folder; a counter "
                                                          "is added and nothing is overwritten."}),
            },
            "optional": {
                "model_c": (optional, {"default": NONE, "tooltip": "Model C, or none."}),
                "model_d": (optional, {"default": NONE, "tooltip": "Model D, or none."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def merge(self, model_a, model_b, method, weights, rules, params, preset, missing, other_keys, dtype, dry_run,
              output_folder, filename_prefix, model_c=NONE, model_d=NONE, unique_id=None, ratio=DEFAULT_RATIO):
        chosen = [m for m in (model_a, model_b, model_c, model_d) if m and m != NONE]
        connected = [n for n, m in zip(SOCKETS, (model_a, model_b, model_c, model_d)) if m and m != NONE]
        weights = ratio_weights(ratio, weights, method, len(chosen))
        plan = plan_for_sockets(connected, True, [resolve_model_file(m) for m in chosen], method, weights, rules,
                                missing, params, [preset], other_keys)
        largest = max((kp.numel for kp in plan.keys), default=0)
        device = compute_device(largest * 4 * (len(chosen) + 3))
        gguf = dtype in GGUF_OUTPUT_TYPES or (dtype == "keep" and kept_gguf_type(plan) is not None)  # A is GGUF
        out = None if dry_run else output_path(output_folder, filename_prefix, ".gguf" if gguf else ".safetensors")
        est = merge_estimate(plan, out, None if dtype == "keep" else dtype, device)
        est.check_disk()  # before any work: the output does not fit
        rep = execute_merge(plan, out, None if dtype == "keep" else dtype, device, progress(len(plan.keys), unique_id))
        text = est.text() + "\n" + rep.table()
        return {"ui": ui_report(text, rep.to_dict()),
                "result": ("" if out is None else str(out), text, image_tensor(rep.chart()))}


NODE_CLASS_MAPPINGS = {
    "WeightsmithMergeModels": WeightsmithMergeModels,
    "WeightsmithMergeFiles": WeightsmithMergeFiles,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WeightsmithMergeModels": "Merge Models (Weightsmith)",
    "WeightsmithMergeFiles": "Merge Model Files (Weightsmith)",
}
