"""Planning a bake: which model key every LoRA module patches, with what strength, checked from headers.

Nothing heavy happens here: the model's header gives every key's shape and dtype, each LoRA is read into
the canonical model (`lora.formats.load_lora`), and every module is mapped to the model key it patches:
`diffusion_model.<name>` → `<prefix><name>.weight` of the model's diffusion view; a text-encoder module
→ the matching key of a full checkpoint's text encoder (ComfyUI, SD1.5 and SDXL layouts, SDXL's OpenCLIP
clip_g with q/k/v as row slices of `in_proj_weight`). An architecture mismatch, a shape that does not fit
or (with `strict`) a module that matches nothing is refused before a byte is written.

Per-block strengths: rules `PATTERN=FACTOR` (PATTERN a regex searched in the key name without the
checkpoint prefix, or a merge `@group` alias such as `@single`, `@double.3`, `@in.4`), first match wins;
the factor multiplies the LoRA's strength on the matching keys. Each LoRA's own rules come before the
global ones.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..arch import ArchInfo, arch_family, detect_arch
from ..engine import OutputKey
from ..errors import MismatchError, WeightsmithError
from ..lora import keymaps as km
from ..lora.formats import infer_arch, load_lora
from ..lora.model import LoRA, ModuleDelta
from ..merge.rules import expand_alias, parse_rule_lines
from ..report import an_arch, arch_name
from ..sources import TensorSource, as_source, detect_diffusion_prefix

# ---------------------------------------------------------------------------------------------------
# Strength rules


@dataclass(frozen=True)
class StrengthRule:
    text: str
    pattern: str
    factor: float

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def parse_strength_rule(text: str) -> StrengthRule:
    """`@single=0.5`, `double_blocks\\.1[0-8]\\.=0` or `@img=weight:0.8` -> StrengthRule."""
    s = text.strip()
    left, sep, right = s.rpartition("=")
    value = right.strip()
    if value.lower().startswith(("weight:", "weights:")):
        value = value.split(":", 1)[1].strip()
    try:
        factor = float(value)
    except ValueError:
        factor = math.nan
    if not sep or not left.strip() or not math.isfinite(factor):
        raise WeightsmithError(f"strength rule {text!r}: expected PATTERN=FACTOR, e.g. '@single=0.5' or "
                               "'double_blocks\\.0\\.=0' (PATTERN a regex or @group, FACTOR a number)")
    pattern = expand_alias(left.strip())
    try:
        re.compile(pattern)
    except re.error as e:
        raise WeightsmithError(f"strength rule {text!r}: bad regex {left.strip()!r}: {e}") from None
    return StrengthRule(s, pattern, factor)


def parse_strength_rules(lines) -> list[StrengthRule]:
    """Rules from a list or multiline text (blank lines and '#' comments skipped)."""
    return parse_rule_lines(lines, parse_strength_rule, StrengthRule)


def rule_factor(name: str, rules: Sequence[StrengthRule]) -> tuple[float, StrengthRule | None]:
    for r in rules:
        if r.matches(name):
            return r.factor, r
    return 1.0, None


# ---------------------------------------------------------------------------------------------------
# Plan


@dataclass
class Patch:
    """One LoRA module applied to one model key (or to a row slice of it)."""

    lora: int  # index into plan.loras (chain order)
    module: str  # canonical module name
    delta: ModuleDelta
    strength: float  # the LoRA's strength times the rule factor of this key
    bias: bool = False  # patches the bias (diff_b) rather than the weight
    rows: tuple[int, int] | None = None  # rows of the key this module's weight is (OpenCLIP in_proj q/k/v)


@dataclass
class LoraInfo:
    label: str
    name: str
    arch: str
    format: str
    strength: float
    modules: int
    types: str
    matched: int = 0
    unmatched: list[dict] = field(default_factory=list)
    rules: list[StrengthRule] = field(default_factory=list)


@dataclass
class BakePlan:
    source: TensorSource
    model_name: str
    arch: ArchInfo
    loras: list[LoraInfo]
    lora_paths: list[Path]
    patches: dict[str, list[Patch]]  # raw model key -> patches in chain order
    rules: list[StrengthRule]
    rule_hits: dict[str, int]
    notes: list[str]

    @property
    def unmatched(self) -> list[dict]:
        return [u for info in self.loras for u in info.unmatched]

    def protect_paths(self) -> list[Path]:
        return [*self.source.paths(), *self.lora_paths]

    def output_specs(self) -> list[OutputKey]:
        """Every output key in the engine's one shape: the model's keys in its order, each read from the
        model (input 0); a patched key's function is "bake" (the adapters' ΔW added), the others "copy"."""
        out = []
        for k in self.source.keys():
            info = self.source.info(k)
            out.append(OutputKey(k, tuple(info.shape), info.dtype, ((0, k),), "bake" if k in self.patches else "copy"))
        return out

    def summary(self) -> dict:
        return {
            "model": self.model_name,
            "arch": self.arch.arch,
            "loras": [{k: v for k, v in vars(i).items() if k != "rules"} | {"rules": [r.text for r in i.rules]}
                      for i in self.loras],
            "rules": [{"rule": r.text, "keys": self.rule_hits.get(r.text, 0)} for r in self.rules],
            "patched_keys": len(self.patches),
            "keys": len(self.source),
            "unmatched": self.unmatched,
            "notes": self.notes,
        }


LoraInput = str | os.PathLike | LoRA | Mapping[str, torch.Tensor]


def _as_spec(item) -> tuple[LoraInput, float, list[StrengthRule]]:
    """(lora) / (lora, strength) / (lora, strength, rules) -> (lora, strength, rules)."""
    if isinstance(item, (tuple, list)):
        if not 1 <= len(item) <= 3:
            raise WeightsmithError(f"a LoRA entry is (lora, strength, rules), got {len(item)} items")
        lora = item[0]
        strength = float(item[1]) if len(item) > 1 and item[1] is not None else 1.0
        rules = parse_strength_rules(item[2]) if len(item) > 2 else []
        return lora, strength, rules
    return item, 1.0, []


def _lora_label(lora: LoraInput, i: int) -> str:
    if isinstance(lora, (str, os.PathLike)):
        return Path(lora).name
    return f"LoRA {i + 1}"


def _is_lora(obj) -> bool:
    """A canonical LoRA (also one made by the node pack's own copy of this package: compared by shape)."""
    return isinstance(obj, LoRA) or (hasattr(obj, "modules") and hasattr(obj, "source_format")
                                     and not isinstance(obj, Mapping))


def _read_lora(lora: LoraInput, arch: ArchInfo, label: str, model_name: str) -> tuple[LoRA, str]:
    """The LoRA in canonical form and its own architecture; a LoRA of another family is refused."""
    hint = arch.lora_arch
    if _is_lora(lora):
        lo = lora
        own = lo.arch if lo.arch != "unknown" else infer_arch(lo)
    else:
        try:
            lo = load_lora(lora, arch=hint)
        except MismatchError as e:
            raise MismatchError(f"{label} does not fit the model {model_name} ({arch_name(arch.arch)}): {e}") from e
        own = infer_arch(lo)
    if own != "unknown" and arch_family(own) != arch_family(hint):
        raise MismatchError(f"{label} is {an_arch(own)} LoRA and {model_name} is {an_arch(arch.arch)} model: it cannot be baked "
                            "into it; give a model of the LoRA's architecture")
    if hint == "chroma" and own == "flux" and any(km.is_flux_modulation(n[len(km.DIFFUSION):]) for n in lo.modules):
        raise MismatchError(f"{label} is a Flux LoRA with modulation layers Chroma does not have; convert it first "
                            "(`weightsmith convert --target-arch chroma`)")
    return lo, own


# Text encoders: where a canonical module's weight lives in a full checkpoint, per layout.
_TE_PREFIXES = {
    "clip_l": ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.", "conditioner.embedders.0.transformer.",
               "text_encoders.clip_l.", "cond_stage_model.clip_l.transformer."),
    "clip_g": ("text_encoders.clip_g.transformer.", "conditioner.embedders.1.transformer.",
               "cond_stage_model.clip_g.transformer."),
    "t5xxl": ("text_encoders.t5xxl.transformer.", "cond_stage_model.t5xxl.transformer."),
}
_OPENCLIP = "conditioner.embedders.1.model.transformer.resblocks."
_OPENCLIP_LEAF = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _te_target(module: str, keys: set[str], source: TensorSource, bias: bool) -> tuple[str, tuple[int, int] | None] | None:
    """(raw key, rows) of the checkpoint weight/bias a text-encoder module patches, or None."""
    enc, hf = km.split_te(module) or ("", "")
    suffix = ".bias" if bias else ".weight"
    for prefix in _TE_PREFIXES.get(enc, ()):
        if prefix + hf + suffix in keys:
            return prefix + hf + suffix, None
    if enc == "clip_g":  # SDXL checkpoints keep OpenCLIP's layout: q/k/v are row thirds of in_proj
        m = re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$", hf)
        if m:
            base = f"{_OPENCLIP}{m.group(1)}."
            leaf = m.group(2)
            if leaf in _OPENCLIP_LEAF and base + _OPENCLIP_LEAF[leaf] + suffix in keys:
                return base + _OPENCLIP_LEAF[leaf] + suffix, None
            q = re.match(r"^self_attn\.(q|k|v)_proj$", leaf)
            key = base + ("attn.in_proj_bias" if bias else "attn.in_proj_weight")
            if q and key in keys:
                h = source.info(key).shape[0] // 3
                return key, (_QKV[q.group(1) + "_proj"] * h, h)
    return None


def _check_fit(mod: ModuleDelta, shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> str | None:
    """Why `mod` cannot patch a weight of `shape` (None when it can): every factor's rows and columns."""
    rows, cols = shape[0] if shape else 1, math.prod(shape[1:]) if len(shape) > 1 else 1
    for t in mod.terms:
        s, n = t.rows if t.rows is not None else (0, rows)
        r_ok = s + n <= rows and t.up.shape[0] == n
        if not r_ok or t.down[0].numel() != cols:
            return (f"its low-rank factors make a [{t.up.shape[0]}, {t.down[0].numel()}] change"
                    + (f" for rows {s}..{s + n}" if t.rows is not None else ""))
    for a in mod.adapters:
        s, n = a.rows if a.rows is not None else (0, rows)
        if s + n > rows or a.out_rows != n or (len(shape) == 2 and a.in_features != cols):
            return f"its {a.kind} adapter makes a [{a.out_rows}, {a.in_features}] change"
    for what, t in (("full diff", mod.diff), ("replacement", mod.set_weight)):
        if t is not None and (t.numel() != math.prod(shape) or t.shape[0] != rows):
            return f"its {what} is {list(t.shape)}"
    if mod.diff_b is not None and (bias_shape is None or mod.diff_b.numel() != math.prod(bias_shape)):
        return (f"its bias change is {list(mod.diff_b.shape)}, the model has "
                + ("no bias there" if bias_shape is None else f"a bias of {list(bias_shape)}"))
    return None


def plan_bake(
    model: str | os.PathLike | TensorSource | Mapping[str, torch.Tensor],
    loras: Iterable,
    rules=None,
    strict: bool = False,
) -> BakePlan:
    """Map every module of every LoRA to the model key it patches, from headers only. `loras`: paths,
    LoRA objects or state dicts, alone or as (lora, strength[, rules]) in chain order; `rules` apply
    to every LoRA after its own. An architecture mismatch or a shape that does not fit raises
    MismatchError; modules that match no key are listed (MismatchError with `strict`)."""
    source = as_source(model)
    model_name = Path(source.name).name if source.paths() else source.name
    specs = [_as_spec(x) for x in loras]
    if not specs:
        raise WeightsmithError("give at least one LoRA to bake into the model")
    arch = detect_arch(source)
    if arch.arch == "unknown":
        raise MismatchError(f"{model_name}: cannot tell the model's architecture ({arch.reason or arch.naming}); "
                            "bake takes Flux, Chroma, SDXL and SD1.5 models")
    if arch.naming == "diffusers":
        raise MismatchError(f"{model_name}: the model uses diffusers key names; LoRAs are matched to ComfyUI/BFL "
                            "(or LDM) names: convert the model to a single ComfyUI file first")
    global_rules = parse_strength_rules(rules)
    keys = set(source.keys())
    prefix = detect_diffusion_prefix(source.keys())
    has_te = any(k.startswith(("text_encoders.", "cond_stage_model.", "conditioner.")) for k in keys)
    patches: dict[str, list[Patch]] = {}
    infos: list[LoraInfo] = []
    paths: list[Path] = []
    rule_hits = {r.text: 0 for r in global_rules}
    for i, (lora_in, strength, own_rules) in enumerate(specs):
        label = _lora_label(lora_in, i)
        for r in own_rules:
            rule_hits.setdefault(r.text, 0)
        if isinstance(lora_in, (str, os.PathLike)):
            paths.append(Path(lora_in))
        lora, own = _read_lora(lora_in, arch, label, model_name)
        types: dict[str, int] = {}
        for m in lora.modules.values():
            for k in m.types():
                types[k] = types.get(k, 0) + 1
        info = LoraInfo(label, label, own, lora.source_format, strength, len(lora.modules),
                        ", ".join(f"{k} {n}" for k, n in types.items()), rules=own_rules)
        if isinstance(lora_in, (str, os.PathLike)):
            info.name = str(lora_in)
        all_rules = [*own_rules, *global_rules]
        for name, mod in lora.modules.items():
            if mod.is_empty():
                continue
            te = km.split_te(name) is not None
            btarget = None
            if te:
                target = _te_target(name, keys, source, bias=False)
                wkey, rows = target if target else (None, None)
                btarget = _te_target(name, keys, source, bias=True) if mod.diff_b is not None else None
                bkey = btarget[0] if btarget else None
                match_name = wkey or name
            else:
                short = km.weight_key(name)
                wkey, rows = (prefix + short if prefix + short in keys else None), None
                bkey = prefix + km.bias_key(name) if prefix + km.bias_key(name) in keys else None
                match_name = short
            if wkey is None:
                why = ("the model file has no text encoder" if te and not has_te
                       else "the model has no such layer")
                info.unmatched.append({"lora": label, "module": name, "reason": why})
                continue
            shape = source.info(wkey).shape
            if rows is not None:
                shape = (rows[1], *shape[1:])
            bshape = source.info(bkey).shape if bkey else None
            if bkey and btarget and btarget[1] is not None:
                bshape = (btarget[1][1],)
            why = _check_fit(mod, tuple(shape), bshape)
            if why:
                own_txt = f" (the LoRA reads as {own})" if own != "unknown" else ""
                raise MismatchError(f"{label}: module {name} does not fit {wkey} of {model_name}: the model's weight "
                                    f"is {list(shape)}, {why}{own_txt}; is the LoRA for another model?")
            factor, rule = rule_factor(match_name.removeprefix(prefix), all_rules)
            if rule is not None:
                rule_hits[rule.text] = rule_hits.get(rule.text, 0) + 1
            s = strength * factor
            info.matched += 1
            if s == 0:
                continue  # ComfyUI skips a LoRA at strength 0 altogether
            weight_part = ModuleDelta(terms=mod.terms, diff=mod.diff, set_weight=mod.set_weight, adapters=mod.adapters)
            if not weight_part.is_empty():
                patches.setdefault(wkey, []).append(Patch(i, name, weight_part, s, rows=rows))
            if mod.diff_b is not None:
                if bkey is None:
                    raise MismatchError(f"{label}: module {name} changes a bias the model {model_name} does not have "
                                        f"next to {wkey}")
                brows = btarget[1] if te and btarget else None
                patches.setdefault(bkey, []).append(Patch(i, name, ModuleDelta(diff_b=mod.diff_b), s, bias=True,
                                                          rows=brows))
        infos.append(info)
    notes = []
    unmatched = [u for info in infos for u in info.unmatched]
    if unmatched:
        shown = ", ".join(f"{u['module']} ({u['lora']}: {u['reason']})" for u in unmatched[:6])
        msg = f"{len(unmatched)} LoRA modules match nothing in {model_name}: {shown}" + (" …" if len(unmatched) > 6 else "")
        if strict:
            raise MismatchError(msg + "; nothing was written (leave out --strict to bake the rest)")
        notes.append(msg)
    for text, n in rule_hits.items():
        if n == 0:
            notes.append(f"rule {text!r} matched no patched key")
    if not patches:
        notes.append("no LoRA module patches any key: the output equals the model")
    # keep the model's key order: the output is the model with some keys patched
    order = {k: j for j, k in enumerate(source.keys())}
    patches = dict(sorted(patches.items(), key=lambda kv: order[kv[0]]))
    return BakePlan(source, model_name, arch, infos, paths, patches, [*global_rules], rule_hits, notes)
