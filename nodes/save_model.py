"""Save Model, streaming: a MODEL (a ModelPatcher with its patches: LoRAs, merges, …) written to a
safetensors file tensor by tensor.

ComfyUI's own ModelSave patches the whole model in memory first (`load_models_gpu(force_patch_weights=True)`,
then a state dict of every weight). Here each key's effective weight is computed alone, ComfyUI's way:
its base weight (from the patcher's backup when the model is currently loaded patched) and that key's
patch list through `comfy.lora.calculate_weight` (the same function ComfyUI patches with, so LoRA/LoKr/
LoHa/DoRA and ModelMergeSimple's nested patches mean exactly what they mean in a sampler). The result
is cast (or fp8-encoded) and written through the StreamingWriter, then dropped before the next key:
peak memory is the model ComfyUI already holds plus a few copies of one tensor, never a second model.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from ..core.dtypes import MODEL_OUTPUT_CHOICES, all_finite, cast_for_output, dtype_name
from ..core.encodings.encode import OutputLayout, parse_output, write_encoded
from ..core.errors import WeightsmithError
from ..core.report import format_table
from ..core.safetensors_io import StreamingWriter
from .common import (
    CATEGORY,
    PatcherSource,
    compute_device,
    model_arch,
    output_path,
    progress,
    ui_report,
)

OUTPUT_FOLDERS = ["diffusion_models", "checkpoints"]
SAVE_META_KEY = "weightsmith.save_model"


# ---------------------------------------------------------------------------------------------------
# Pure helpers (no ComfyUI import): what a patch list holds, the names keys get in the file


def patch_kind(patch: tuple) -> str:
    """What one entry of a ModelPatcher patch list is: a weight adapter's name (lora, lokr, loha, glora,
    …, as `comfy.weight_adapter` names them), "merge" for a nested list (another model's weight, as
    ModelMergeSimple/ModelMergeBlocks add it), or the legacy tuple's tag ("diff", "set", …)."""
    v = patch[1]
    if isinstance(v, list):
        return "merge"
    name = getattr(v, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(v, tuple) and len(v) == 1:  # calculate_weight reads a 1-tuple as a full diff
        return "diff"
    if isinstance(v, tuple) and v and isinstance(v[0], str):
        return v[0]
    return type(v).__name__


def patch_counts(key_patches: Mapping[str, list]) -> Counter[str]:
    """kind -> number of keys that kind patches, from `get_key_patches` lists (first entry: the weight)."""
    kinds: Counter[str] = Counter()
    for entries in key_patches.values():
        kinds.update(set(patch_kind(p) for p in entries[1:]))
    return kinds


def saved_names(names: Iterable[str], rename: Callable[[dict], dict] | None) -> dict[str, str]:
    """name in the model -> name in the file. `rename` is the model config's
    `process_unet_state_dict_for_saving` for a checkpoint (it only rewrites prefixes: it is given the
    names themselves as values), None for a diffusion_models file (the model's own names, which
    UNETLoader reads back). A rename that drops, merges or invents keys is refused."""
    names = list(names)
    if rename is None:
        return {n: n for n in names}
    renamed = rename({n: n for n in names})
    out = {v: k for k, v in renamed.items() if isinstance(v, str)}
    if len(out) != len(names) or set(out) != set(names):
        raise WeightsmithError("this model's checkpoint layout renames its weights in a way the streaming save "
                               "cannot follow; save to diffusion_models instead")
    return out


def common_prefix(renamed: Mapping[str, str]) -> str:
    """The prefix the file puts before the model's own names ("" for a diffusion_models file)."""
    for name, out in renamed.items():
        return out[: len(out) - len(name)] if out.endswith(name) else ""
    return ""


def out_dtype(stored: torch.dtype, want: torch.dtype | None) -> torch.dtype:
    """The plain output dtype of a tensor: `want` for float tensors (None: keep), others unchanged."""
    return stored if want is None or not stored.is_floating_point else want


# ---------------------------------------------------------------------------------------------------
# The streaming save


class SaveReport:
    def __init__(self, path: Path, arch: str, choice: str, layout: OutputLayout, kinds: Counter[str], patched: int,
                 total: int, seconds: float, nbytes: int, device: str):
        self.path, self.arch, self.choice, self.layout = path, arch, choice, layout
        self.kinds, self.patched, self.total = kinds, patched, total
        self.seconds, self.bytes, self.device = seconds, nbytes, device

    @property
    def summary(self) -> str:
        return (f"saved {self.total} weights ({self.patched} patched) to {self.path.name}, "
                f"{self.bytes / 1e9:.2f} GB")

    def to_dict(self) -> dict:
        return {"summary": self.summary, "output": str(self.path), "arch": self.arch, "dtype": self.choice,
                "keys": self.total, "patched_keys": self.patched, "patches": dict(self.kinds),
                "written": self.layout.summary(), "bytes_written": self.bytes, "seconds": round(self.seconds, 3),
                "device": self.device}

    def table(self) -> str:
        lines = [f"save MODEL ({self.arch}) to {self.path}",
                 f"{self.total} weights, {self.patched} of them patched, each computed as ComfyUI patches it "
                 f"(comfy.lora.calculate_weight, fp32) and written one at a time"]
        if self.kinds:
            lines.append(format_table([{"patch": k, "keys": n} for k, n in self.kinds.most_common()],
                                      title="patches in the MODEL (keys per kind)"))
        else:
            lines.append("the MODEL has no weight patches: its weights are written as they are")
        lines.append(format_table([{"written as": k, "tensors": n} for k, n in self.layout.summary().items()],
                                  title=f"output dtype {self.choice}"))
        lines.append(f"wrote {self.bytes / 1e9:.2f} GB in {self.seconds:.1f} s (device {self.device})")
        return "\n".join(lines)


def _nonfinite_error(key: str, kinds: list[str], dtype: torch.dtype | None) -> WeightsmithError:
    if dtype is not None:
        return WeightsmithError(f"the patched weight {key!r} exceeds {dtype_name(dtype)}'s range; choose a wider "
                                "dtype (bf16 or fp32). Nothing was written")
    cause = f"its patches ({', '.join(kinds)}) make it NaN/Inf: lower their strength" if kinds else \
        "the model already holds NaN/Inf there (a corrupt file?)"
    return WeightsmithError(f"weight {key!r}: {cause}. Nothing was written")


@torch.no_grad()
def save_patched_model(patcher, out: Path, choice: str, device: torch.device, checkpoint: bool = False,
                       progress_fn: Callable[[int, int], None] | None = None) -> SaveReport:
    """Write `patcher`'s diffusion model, every patch applied, to `out` key by key (see the module doc)."""
    source = PatcherSource(patcher, device)
    source.nonfinite = "ignore"  # the written values are checked instead, with a message naming the cause
    keys = source.keys()
    config = patcher.model.model_config
    names = saved_names(keys, config.process_unet_state_dict_for_saving if checkpoint else None)
    layout = OutputLayout(choice, common_prefix(names))
    want = layout.choice.dtype
    for k in keys:
        info = source.info(k)
        layout.add(names[k], info.shape, out_dtype(info.dtype, want), k, source.encoding(k), source, k, "the MODEL")
    plan = layout.writer_plan()
    extra = {}
    if checkpoint and getattr(patcher.model, "model_type", None) is not None and patcher.model.model_type.name == "V_PREDICTION":
        extra["v_pred"] = torch.tensor([])  # what ComfyUI's own checkpoint save adds for v-prediction models
        plan["v_pred"] = ((0,), torch.float32)
    kinds = patch_counts({k: source.key_patches(k) for k in keys})
    arch = model_arch(patcher)
    meta = layout.metadata({SAVE_META_KEY: json.dumps({"arch": arch, "dtype": layout.choice.name,
                                                       "patches": dict(kinds)})})
    report_fn = progress_fn or (lambda done, total: None)
    t0 = time.perf_counter()
    patched = 0
    with StreamingWriter(out, plan, meta) as writer:
        report_fn(0, len(keys))  # also where ComfyUI's Interrupt is raised: the temp file is then removed
        layout.write_extras(writer)
        for name, t in extra.items():
            writer.write(name, t)
        for i, k in enumerate(keys):
            entries = source.key_patches(k)
            patched += len(entries) > 1
            w = source.get(k)  # this key's effective weight, fp32 on `device`
            ko = layout.keys[names[k]]
            if w.is_floating_point() and not all_finite(w):
                raise _nonfinite_error(k, sorted({patch_kind(p) for p in entries[1:]}), None)
            if ko.fmt is not None:
                write_encoded(writer, ko, w.float())
            else:
                y = cast_for_output(w, ko.dtype) if w.dtype != ko.dtype else w
                if y.is_floating_point() and not all_finite(y):
                    raise _nonfinite_error(k, [], ko.dtype)
                writer.write(ko.key, y.cpu())
            del w
            report_fn(i + 1, len(keys))
    return SaveReport(out, arch, layout.choice.name, layout, kinds, patched, len(keys), time.perf_counter() - t0,
                      writer.total_bytes, str(device))


class WeightsmithSaveModel:
    DESCRIPTION = (
        "Save a MODEL with everything patched into it (LoRAs from LoraLoaderModelOnly, merges from ModelMergeSimple "
        "and friends, Weightsmith's own patches) as a safetensors file, one weight at a time: each weight is patched "
        "exactly as ComfyUI patches it for sampling, cast and written, so memory never holds a second copy of the "
        "model (ComfyUI's Save Model patches the whole model first). diffusion_models: loads with Load Diffusion "
        "Model; checkpoints: the layout Save Model writes (diffusion model only). Interrupt leaves no partial file."
    )
    CATEGORY = f"{CATEGORY}/Save"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "report")
    OUTPUT_TOOLTIPS = ("full path of the written file", "the report: patches found, dtypes written, size, time")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to save, with its patches (LoRAs, merges)."}),
                "dtype": (MODEL_OUTPUT_CHOICES, {
                    "default": "bf16",
                    "tooltip": "Dtype of the saved weights (the math is fp32). keep: as ComfyUI holds each weight "
                               "(fp32 on a CPU; scaled fp8 stays scaled fp8 with fresh scales). fp8_e4m3fn/e5m2: a "
                               "plain cast. fp8_scaled: ComfyUI scaled fp8 for Linear weights, per-tensor scale."}),
                "output_folder": (OUTPUT_FOLDERS, {
                    "default": "diffusion_models",
                    "tooltip": "diffusion_models: the model's own key names, for Load Diffusion Model. checkpoints: "
                               "ComfyUI's checkpoint key names (as Save Model writes them, without CLIP/VAE)."}),
                "filename_prefix": ("STRING", {"default": "weightsmith/saved_model",
                                               "tooltip": "File name prefix inside the output folder; a counter is "
                                                          "added and nothing is overwritten."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def save(self, model, dtype, output_folder, filename_prefix, unique_id=None):
        if output_folder not in OUTPUT_FOLDERS:
            raise WeightsmithError(f"output_folder {output_folder!r}: choose one of {', '.join(OUTPUT_FOLDERS)}")
        parse_output(dtype)  # an unknown dtype is refused before any folder is made
        device = compute_device()
        out = output_path(output_folder, filename_prefix)
        # the bar's total is set by the first update, (0, number of weights)
        rep = save_patched_model(model, out, dtype, device, checkpoint=output_folder == "checkpoints",
                                 progress_fn=progress(1, unique_id))
        text = rep.table()
        return {"ui": ui_report(text, rep.to_dict()), "result": (str(out), text)}


NODE_CLASS_MAPPINGS = {"WeightsmithSaveModel": WeightsmithSaveModel}
NODE_DISPLAY_NAME_MAPPINGS = {"WeightsmithSaveModel": "Save Model, Streaming (Weightsmith)"}
