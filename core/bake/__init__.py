"""Baking LoRAs into a model file, streaming: plan from headers (`plan`), then key by key (`execute`)."""

from .execute import BakeReport, apply_patches, bake, execute_bake
from .plan import BakePlan, StrengthRule, parse_strength_rules, plan_bake

__all__ = ["BakePlan", "BakeReport", "StrengthRule", "apply_patches", "bake", "execute_bake", "parse_strength_rules",
           "plan_bake"]
