"""LoRAs: one canonical in-memory representation; file formats are readers/writers at the edge."""

from .model import LoRA, LoraTerm, ModuleDelta

__all__ = ["LoRA", "LoraTerm", "ModuleDelta"]
