"""Model merging: methods registry, per-key rules, planning and streaming execution."""

from .execute import execute_merge, merge
from .methods import METHODS, derive_seed, get_method, merge_method
from .plan import KeyPlan, MergePlan, plan_merge
from .report import MergeReport
from .rules import PRESETS, Rule, group_aliases, parse_rule, parse_rules

__all__ = [
    "METHODS", "PRESETS", "KeyPlan", "MergePlan", "MergeReport", "Rule", "derive_seed", "execute_merge",
    "get_method", "group_aliases", "merge", "merge_method", "parse_rule", "parse_rules", "plan_merge",
]
