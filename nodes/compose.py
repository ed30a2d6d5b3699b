"""Compose LoRAs (up to 4 + a chained `extra`) with strengths into one LORA, exact or re-compressed, and
re-rank a single LORA. Thin: sockets/widgets → `core.lora.compose`."""

from __future__ import annotations

from ..core.lora.compose import DEFAULT_WARN_RANK, compose_loras, rerank_lora
from .common import CATEGORY, LORA_TYPE, MAX_RANK, STRENGTH, compute_device, progress, ui_report

SLOTS = 4

RANK_TOOLTIP = ("0 = exact: the output's rank per module is the sum of the inputs' ranks. Above 0: re-compress every "
                "module to at most this rank, optimally (truncated SVD computed from the factors, never a dense matrix).")
ENERGY_TOOLTIP = ("0 = off. Otherwise keep the smallest rank per module that holds this fraction of the composed change's "
                  "energy (sum of squared singular values), e.g. 0.99; with a rank too, the smaller of the two.")


def _modules_total(loras) -> int:
    return len(set().union(*(lo.modules for lo in loras))) if loras else 0


class WeightsmithComposeLoRAs:
    DESCRIPTION = ("Compose up to 4 LoRAs (plus a chained 'extra') into one LoRA, each with its own strength. Exact "
                   "by default: the result applied at strength 1 equals applying each input with its strength "
                   "(LoraLoaderModelOnly chained). Set a rank or energy to re-compress optimally; the report shows "
                   "each module's rank and error. Inputs must be for the same architecture (convert Flux LoRAs with "
                   "Flux→Chroma first for Chroma).")
    CATEGORY = f"{CATEGORY}/LoRA"
    FUNCTION = "compose"
    OUTPUT_NODE = False
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The composed LoRA (save it with Save LoRA, or apply it with Apply LoRA).",
                       "The composition report as text: per-module rank and error.")

    @classmethod
    def INPUT_TYPES(cls):
        strength = STRENGTH
        required = {
            f"strength_{i}": ("FLOAT", {**strength, "tooltip": f"Strength of lora_{i} (negative subtracts it; 0 leaves it out)."})
            for i in range(1, SLOTS + 1)
        }
        required["rank"] = ("INT", {"default": 0, "min": 0, "max": MAX_RANK, "step": 1, "tooltip": RANK_TOOLTIP})
        required["energy"] = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": ENERGY_TOOLTIP})
        optional = {f"lora_{i}": (LORA_TYPE, {"tooltip": f"LoRA number {i} (optional)."}) for i in range(1, SLOTS + 1)}
        optional["extra"] = (LORA_TYPE, {"tooltip": "Another composed LoRA, added at strength 1: chain two Compose "
                                                    "nodes to stack more than 4 LoRAs."})
        return {"required": required, "optional": optional, "hidden": {"unique_id": "UNIQUE_ID"}}

    def compose(self, rank, energy, unique_id=None, **kw):
        items, names = [], []
        for i in range(1, SLOTS + 1):
            lora = kw.get(f"lora_{i}")
            if lora is not None:
                items.append((lora, float(kw.get(f"strength_{i}", 1.0))))
                names.append(f"lora_{i}")
        if kw.get("extra") is not None:
            items.append((kw["extra"], 1.0))
            names.append("extra")
        if not items:
            raise ValueError("Compose LoRAs: connect at least one LoRA input")
        lora, report = compose_loras(
            items, rank=rank or None, energy=energy or None, warn_rank=DEFAULT_WARN_RANK, names=names,
            device=compute_device(), progress=progress(_modules_total([lo for lo, _ in items]), unique_id),
        )
        text = report.text()
        return {"ui": ui_report(text, report.to_dict()), "result": (lora, text)}


class WeightsmithRerankLoRA:
    DESCRIPTION = ("Reduce a LoRA to a lower rank: per module, the optimal rank-r approximation of its change "
                   "(truncated SVD from the factors alone). Modules already at or below the rank stay exact. The "
                   "report shows each module's rank and relative error.")
    CATEGORY = f"{CATEGORY}/LoRA"
    FUNCTION = "rerank"
    OUTPUT_NODE = False
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The re-ranked LoRA.", "The report as text: per-module rank and error.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA_TYPE, {"tooltip": "The LoRA to reduce."}),
                "rank": ("INT", {"default": 32, "min": 0, "max": MAX_RANK, "step": 1,
                                 "tooltip": "Target rank per module (0 = decided by energy alone)."}),
                "energy": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": ENERGY_TOOLTIP}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def rerank(self, lora, rank, energy, unique_id=None):
        if not rank and not energy:
            raise ValueError("Re-rank LoRA: set a rank above 0 or an energy fraction")
        out, report = rerank_lora(lora, rank=rank or None, energy=energy or None, device=compute_device(),
                                  progress=progress(len(lora.modules), unique_id))
        text = report.text()
        return {"ui": ui_report(text, report.to_dict()), "result": (out, text)}


NODE_CLASS_MAPPINGS = {
    "WeightsmithComposeLoRAs": WeightsmithComposeLoRAs,
    "WeightsmithRerankLoRA": WeightsmithRerankLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WeightsmithComposeLoRAs": "Compose LoRAs (Weightsmith)",
    "WeightsmithRerankLoRA": "Re-rank LoRA (Weightsmith)",
}
