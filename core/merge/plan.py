"""Planning a merge: for every output key, which inputs are read and what is done with them.

Planning reads headers only (shapes and dtypes), so it is instant and catches every mismatch before a
byte is written. Keys are matched by name after the checkpoint prefix is stripped (`diffusion_view`),
so a single file, a diffusers-style shard folder and an index with other split points line up; the
output keeps the prefix convention of the first input. Keys outside the diffusion model (text encoders,
VAE) follow `others`: copied from the first input (default), merged like the rest, or dropped.

A key that only some inputs have follows `missing`: `take` (from the first input that has it), `drop`,
or `error`; all such keys are listed in the plan. Shapes that differ are an error naming the key and
the shapes unless a rule takes the key from one input; nothing is ever broadcast.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from ..arch import detect_arch
from ..engine import OutputKey
from ..errors import MismatchError, WeightsmithError
from ..sources import DiffusionLayout, TensorSource, as_source, diffusion_layout, key_group
from . import rules as _rules
from .methods import METHODS, MergeMethod, format_params, get_method
from .rules import Rule, input_label, parse_input_ref, parse_params, parse_rules, parse_weights, preset_rules, resolve

MISSING_POLICIES = ("take", "drop", "error")
_NO_PARAMS = MappingProxyType({})
OTHERS_POLICIES = ("copy", "merge", "drop")


@dataclass(slots=True)  # one per key, and a model can hold 10^5 keys
class KeyPlan:
    name: str  # matching name (prefix stripped for diffusion-model keys)
    out_key: str  # key written to the output
    action: str  # "merge" | "take" | "drop"
    reads: tuple[tuple[int, str], ...]  # (input index, raw key in that input), in input order
    shape: tuple[int, ...]
    in_dtype: torch.dtype  # dtype of the first tensor read (the output keeps it unless told otherwise)
    method: str | None = None
    params: dict = field(default_factory=dict)
    weights: tuple[float, ...] = ()
    decided_by: str = "default"  # rule text or policy that decided the action
    group: str = ""
    part: str = "unet"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class InputInfo:
    label: str
    name: str
    arch: str
    prefix: str
    n_keys: int


@dataclass
class MergePlan:
    inputs: list[InputInfo]
    sources: list[TensorSource]
    method: str
    params: dict
    weights: list[float]
    rules: list[Rule]
    missing: str
    others: str
    out_prefix: str
    keys: list[KeyPlan]
    only_in: dict[str, list[str]]
    rule_hits: dict[str, int]
    notes: list[str]
    metadata: dict[str, str]

    def counts(self) -> dict[str, int]:
        c = {"merge": 0, "take": 0, "drop": 0}
        for k in self.keys:
            c[k.action] += 1
        return c

    def output_keys(self) -> list[KeyPlan]:
        return [k for k in self.keys if k.action != "drop"]

    def protect_paths(self) -> list[Path]:
        return [p for s in self.sources for p in s.paths()]

    def output_specs(self) -> list[OutputKey]:
        """Every output key in the engine's one shape (input indices: A = 0, B = 1, …)."""
        return [OutputKey(k.out_key, k.shape, k.in_dtype, k.reads, k.method if k.action == "merge" else "copy")
                for k in self.output_keys()]

    def summary(self) -> dict:
        return {
            "inputs": [vars(i) for i in self.inputs],
            "method": self.method,
            "params": _public_params(self.params),
            "weights": self.weights,
            "rules": [{"rule": r.text, "action": r.describe(), "keys": self.rule_hits.get(r.text, 0)} for r in self.rules],
            "missing_policy": self.missing,
            "others_policy": self.others,
            "output_prefix": self.out_prefix,
            "counts": self.counts(),
            "only_in": self.only_in,
            "notes": self.notes,
        }

    def describe(self, limit: int = 12) -> str:
        """A human summary of the plan (what --dry-run / --plan-only print first)."""
        from ..report import format_table

        lines = [f"merge {len(self.inputs)} inputs with {self.method}"
                 + (f" ({format_params(self.params)})" if self.params else "")
                 + f", weights {', '.join(f'{w:g}' for w in self.weights)}"]
        lines.append(format_table([{"input": i.label, "arch": i.arch, "keys": i.n_keys, "file": i.name} for i in self.inputs]))
        c = self.counts()
        lines.append(f"output: {c['merge']} merged, {c['take']} taken, {c['drop']} dropped keys (prefix {self.out_prefix!r})")
        if self.rules:
            lines.append(format_table([{"rule": r.text, "does": r.describe(), "keys": self.rule_hits.get(r.text, 0)}
                                       for r in self.rules], title="rules (first match wins)"))
        if self.only_in:
            lines.append(f"{len(self.only_in)} keys not in every input:")
            for outcome, names in self.partial_outcomes().items():
                shown = ", ".join(f"{k} [only {'+'.join(self.only_in[k])}]" for k in names[:limit])
                more = f" … and {len(names) - limit} more" if len(names) > limit else ""
                lines.append(f"  {len(names)} {outcome}: {shown}{more}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def partial_outcomes(self) -> dict[str, list[str]]:
        """What became of the keys not every input has, as it happened (a rule may have decided them rather
        than the missing-key policy): outcome text -> key names."""
        plans = {k.name: k for k in self.keys if k.name in self.only_in}
        out: dict[str, list[str]] = {}
        for name in self.only_in:
            kp = plans.get(name)
            if kp is None:
                what = "left out"
            elif kp.decided_by.startswith("missing: "):
                what = f"{kp.decided_by[len('missing: '):]} (missing-key policy {self.missing})"
            elif kp.action == "drop":
                what = f"dropped by the rule {kp.decided_by!r}"
            elif kp.action == "take":
                what = f"taken from {input_label(kp.reads[0][0])} by the rule {kp.decided_by!r}"
            else:
                what = f"merged from {'+'.join(input_label(i) for i, _ in kp.reads)} by the rule {kp.decided_by!r}"
            out.setdefault(what, []).append(name)
        return out


def _public_params(params: dict) -> dict:
    """Parameters as users write them: the base input as a letter, not an index."""
    return {k: (input_label(v) if k == "base" and isinstance(v, int) else v) for k, v in params.items()}


def report_group(name: str, part: str = "unet") -> str:
    """The key group a key is reported under: a numbered block (`double_blocks.3`, `input_blocks.4`,
    `middle_block.1`), else its top module (`time_embed`, `img_in`)."""
    if part != "unet":
        return part
    m = re.match(r"^([A-Za-z_]*blocks?)\.(\d+)\.", name)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    parts = name.split(".")
    if parts[0] == "time_text_embed" and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0]


def _method_params(method: MergeMethod, given: dict, n_inputs: int, where: str) -> dict:
    unknown = set(given) - set(method.defaults)
    if unknown:
        raise WeightsmithError(f"{where}: {method.name} has no parameter {', '.join(sorted(unknown))} "
                               f"(it takes {', '.join(method.defaults) or 'none'})")
    params = {**method.defaults, **given}
    if "base" in params:
        b = params["base"]
        idx = parse_input_ref(b, f"{where}: base") if isinstance(b, str) else int(b)
        if idx >= n_inputs:
            raise _rules.InputCountError(lambda nm: f"{where}: base {b!r} names {nm.name(idx)}, but only {n_inputs} inputs "
                                             f"are {nm.given} ({nm.names(range(n_inputs))}): {nm.add} {nm.name(idx)} or "
                                             "name one of those as the base")
        if not 0 <= idx < n_inputs:
            raise WeightsmithError(f"{where}: base {b!r} is not one of the {n_inputs} inputs")
        params["base"] = idx
    if "seed" in params:
        params["seed"] = int(params["seed"])
    for k, default in method.defaults.items():
        v = params[k]
        if isinstance(default, bool) and not isinstance(v, bool):
            raise WeightsmithError(f"{where}: {method.name} parameter {k} must be true or false, got {v!r}")
        if isinstance(default, float) and not isinstance(v, (int, float)):
            raise WeightsmithError(f"{where}: {method.name} parameter {k} must be a number, got {v!r}")
    return params


def _check_inputs(method: MergeMethod, n: int, where: str) -> None:
    takes = f"{where}: {method.name} ({method.description}) takes {method.inputs_text()} models"
    if n < method.min_inputs:
        raise _rules.InputCountError(lambda nm: f"{takes}, but only {n} are {nm.given} ({nm.names(range(n))}): {nm.add} "
                                         f"{nm.names(range(n, method.min_inputs))} too")
    if method.max_inputs is not None and n > method.max_inputs:
        raise _rules.InputCountError(lambda nm: f"{takes}, but {n} are {nm.given}: {nm.remove} "
                                         f"{nm.names(range(method.max_inputs, n))}, or choose a method for {n} models")


def _check_rule_inputs(rules: list[Rule], n: int) -> None:
    """A rule that takes from (or names as base) an input that is not there: refused before any key is planned,
    naming the rule and the inputs there are (rules that match no key would otherwise pass unnoticed)."""
    for r in rules:
        refs = [r.take] if r.kind == "take" and r.take is not None else []
        if r.kind == "method" and isinstance(r.params.get("base"), str):
            refs.append(parse_input_ref(r.params["base"], f"rule {r.text!r}: base"))
        for idx in refs:
            if idx >= n:
                raise _rules.InputCountError(lambda nm, r=r, idx=idx: (
                    f"rule {r.text!r} names {nm.name(idx)}, but only {n} inputs are {nm.given} "
                    f"({nm.names(range(n))}): {nm.add} {nm.name(idx)}, or change the rule to one of those"))


def _parts(source: TensorSource, layout: DiffusionLayout) -> tuple[dict[str, str], dict[str, str]]:
    """(diffusion name -> raw key, other raw key -> raw key) of one input."""
    diff = dict(layout.names)
    model = set(diff.values())
    return diff, {k: k for k in source.keys() if k not in model}


def _check_overlap(maps: list[tuple[dict[str, str], dict[str, str]]], infos: list[InputInfo]) -> None:
    """Refuse inputs that share no key with any other input: the merge would copy the others unchanged
    and that input would contribute nothing (tensors under another container or prefix, another model,
    an empty file)."""
    def named(i: int) -> str:
        return f"{infos[i].name} ({infos[i].label})"

    fix = ("Give models of one architecture saved with the same key names (`weightsmith inspect` shows a file's "
           "layout)")
    names = [set(diff) | set(other) for diff, other in maps]
    for i, own in enumerate(names):
        if not own:
            raise MismatchError(f"{named(i)} holds no tensors, so it would contribute nothing to the merge (the "
                                f"download may have failed). {fix}")
    for own in sorted(range(len(names)), key=lambda j: len(names[j])):
        own_keys = names[own]
        rest = set().union(*(n for j, n in enumerate(names) if j != own))
        if own_keys.isdisjoint(rest):
            others = ", ".join(named(j) for j in range(len(infos)) if j != own)
            raise MismatchError(f"{named(own)} shares no key with {others} (e.g. {min(own_keys)!r} vs "
                                f"{min(rest)!r}): it would contribute nothing to the merge. {fix}")


def plan_merge(
    sources,
    method: str = "weighted_sum",
    weights=None,
    rules=None,
    missing_policy: str = "take",
    params: dict | str | None = None,
    presets=None,
    others: str = "copy",
) -> MergePlan:
    """Decide, from headers only, what every output key will be. `sources` are paths, dicts or
    TensorSources (A, B, C… in order); `rules` REGEX=ACTION lines (see rules.py) checked before `presets`."""
    srcs = [as_source(s) for s in sources]
    n = len(srcs)
    if n < 2:
        raise WeightsmithError(f"a merge needs at least 2 models, got {n}")
    if missing_policy not in MISSING_POLICIES:
        raise WeightsmithError(f"missing-key policy {missing_policy!r}: choose one of {', '.join(MISSING_POLICIES)}")
    if others not in OTHERS_POLICIES:
        raise WeightsmithError(f"policy for non-diffusion keys {others!r}: choose one of {', '.join(OTHERS_POLICIES)}")
    m = get_method(method)
    _check_inputs(m, n, "method")
    given = parse_params(params, "parameters") if isinstance(params, str) else dict(params or {})
    global_params = _method_params(m, given, n, "parameters")
    w = parse_weights(weights)
    notes: list[str] = []
    explicit_weights = w is not None
    if w is None:
        w = m.default_weights(n)
    elif len(w) != n:
        raise WeightsmithError(f"weights {','.join(f'{x:g}' for x in w)}: give one weight per model ({n})")
    elif m.weights == "none":
        notes.append(f"{m.name} does not use weights; the given weights apply only where a rule picks another method")
    rule_list = parse_rules(rules) + parse_rules(preset_rules(presets or []))
    _check_rule_inputs(rule_list, n)

    infos, prefixes, layouts, namings, families = [], [], [], [], []
    for i, s in enumerate(srcs):
        a = detect_arch(s)
        layout = diffusion_layout(s.keys())
        layout.check(s.name)
        prefix = layout.prefix
        prefixes.append(prefix)
        layouts.append(layout)
        namings.append(a.naming)
        families.append(a.family)
        infos.append(InputInfo(input_label(i), Path(s.name).name if s.paths() else s.name, a.arch, prefix, len(s)))
        notes += [f"{input_label(i)} ({infos[-1].name}): {n}" for n in [*s.notes, layout.note()] if n]
    known_families = {x for x in families if x != "unknown"}
    if len(known_families) > 1:
        detail = ", ".join(f"{i.label} {i.name}: {i.arch}" for i in infos)
        raise MismatchError(f"the inputs are different architectures ({detail}); they cannot be merged: give models "
                            "of one architecture")
    known_namings = {x for x in namings if x != "unknown"}
    if len(known_namings) > 1:
        detail = ", ".join(f"{i.label} {i.name}: {x}" for i, x in zip(infos, namings))
        raise MismatchError(f"the inputs use different key naming ({detail}); keys cannot be matched by name. "
                            "Convert them to one naming first (e.g. diffusers -> ComfyUI/BFL)")

    maps = [_parts(s, layout) for s, layout in zip(srcs, layouts)]
    _check_overlap(maps, infos)
    out_prefix = prefixes[0]

    # (name, part, {input index: raw key}) in output order: A's keys first, then keys only others have
    entries: dict[tuple[str, str], dict[int, str]] = {}
    for i, (diff, other) in enumerate(maps):
        for name, raw in diff.items():
            entries.setdefault((name, "unet"), {})[i] = raw
        if others == "drop" or (others == "copy" and i > 0):
            continue
        for raw in other:
            part = key_group(raw)
            entries.setdefault((raw, part if part != "unet" else "other"), {})[i] = raw

    keys: list[KeyPlan] = []
    only_in: dict[str, list[str]] = {}
    rule_hits = {r.text: 0 for r in rule_list}
    seen_out: set[str] = set()
    for (name, part), present in entries.items():
        has = sorted(present)
        if len(has) < n and (part == "unet" or others == "merge"):
            only_in[name] = [input_label(i) for i in has]
        kp = _plan_key(name, part, present, has, n, srcs, infos, m, global_params, w, explicit_weights, rule_list,
                       rule_hits, missing_policy, others)
        kp.out_key = (out_prefix + name) if part == "unet" else name
        if kp.action != "drop":
            if kp.out_key in seen_out:
                raise MismatchError(f"two input keys map to the output key {kp.out_key!r}; drop one with a rule")
            seen_out.add(kp.out_key)
        keys.append(kp)

    for r in rule_list:
        if rule_hits[r.text] == 0:
            notes.append(f"rule {r.text!r} matched no key")
    if not any(k.action != "drop" for k in keys):
        raise WeightsmithError("the plan writes no tensor at all (every key dropped); check the rules")

    recipe = {"method": m.name, "params": _public_params(global_params), "weights": w, "rules": [r.text for r in rule_list],
              "missing": missing_policy, "others": others, "inputs": [i.name for i in infos]}
    metadata = {"weightsmith.merge": json.dumps(recipe, default=str)}
    return MergePlan(infos, srcs, m.name, global_params, w, rule_list, missing_policy, others, out_prefix, keys,
                     only_in, rule_hits, notes, metadata)


def _named(inputs: list[InputInfo], i: int) -> str:
    """An input as messages name it: its letter and its file (`B tuned.safetensors`)."""
    return f"{inputs[i].label} ({inputs[i].name})"


def _files(inputs: list[InputInfo], which) -> str:
    """`base.safetensors (A) and tuned.safetensors (B)`: the files behind the letters of a message."""
    named = [f"{inputs[i].name} ({inputs[i].label})" for i in which]
    return ", ".join(named[:-1]) + " and " + named[-1] if len(named) > 1 else "".join(named)


def _plan_key(name, part, present, has, n, srcs, inputs, m, global_params, w, explicit_weights, rule_list, rule_hits,
              missing_policy, others) -> KeyPlan:
    infos = {i: srcs[i].info(present[i]) for i in has}
    group = sys.intern(report_group(name, part))  # one string per group, not per key

    def plan(action, reads, decided, method=None, params=None, weights=()):
        first = infos[reads[0]] if reads else infos[has[0]]
        # params are shared between keys (never changed in place: execute copies them per key)
        return KeyPlan(name, "", action, tuple((i, present[i]) for i in reads), first.shape, first.dtype, method,
                       params or _NO_PARAMS, tuple(weights), decided, group, part)

    if part != "unet" and others == "copy":
        return plan("take", [has[0]], "others: copied from A")

    action_rule, weight_rule = resolve(name, rule_list)
    if action_rule is not None:
        rule_hits[action_rule.text] += 1
    if weight_rule is not None:
        rule_hits[weight_rule.text] += 1

    if action_rule is not None and action_rule.kind == "drop":
        return plan("drop", [], action_rule.text)
    if action_rule is not None and action_rule.kind == "take":
        src = has[0] if action_rule.take is None else action_rule.take
        if src not in present:
            raise MismatchError(f"rule {action_rule.text!r}: input {input_label(src)} has no key {name!r} "
                                f"(only {', '.join(_named(inputs, i) for i in has)} have it); take it from one of "
                                "those or change the rule")
        return plan("take", [src], action_rule.text)

    if len(has) < n:
        where = f"{name!r} is only in {', '.join(_named(inputs, i) for i in has)}"
        if missing_policy == "error":
            raise MismatchError(f"{where}; add a rule for it (e.g. '{re.escape(name)}=take:first') or choose "
                                "missing policy take or drop")
        if missing_policy == "drop":
            return plan("drop", [], "missing: dropped")
        return plan("take", [has[0]], f"missing: taken from {input_label(has[0])}")

    dtypes = {i: infos[i].dtype for i in has}
    floats = [d.is_floating_point for d in dtypes.values()]
    if not all(floats):
        if any(floats):
            detail = ", ".join(f"{input_label(i)} {str(d).replace('torch.', '')}" for i, d in dtypes.items())
            raise MismatchError(f"{name!r}: dtypes of different kinds ({detail}) in {_files(inputs, has)}; take it "
                                f"from one input with a rule such as '{re.escape(name)}=take:A'")
        return plan("take", [has[0]], "non-float: copied from A")
    shapes = {i: infos[i].shape for i in has}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{input_label(i)} {list(s)}" for i, s in shapes.items())
        raise MismatchError(f"{name!r}: shapes differ ({detail}) in {_files(inputs, has)}; nothing is broadcast. "
                            f"Take it from one input with a rule such as '{re.escape(name)}=take:A'")

    method, params, decided = m, global_params, "default"
    if action_rule is not None and action_rule.kind == "method":
        method = METHODS[action_rule.method]
        _check_inputs(method, n, f"rule {action_rule.text!r}")
        inherited = {k: v for k, v in global_params.items()} if method.name == m.name else {}
        params = _method_params(method, {**inherited, **action_rule.params}, n, f"rule {action_rule.text!r}")
        decided = action_rule.text
    weights = list(w)
    if weight_rule is not None:
        if len(weight_rule.weights or ()) != n:
            raise WeightsmithError(f"rule {weight_rule.text!r}: give one weight per model ({n})")
        weights = list(weight_rule.weights)
        decided = decided if decided != "default" else weight_rule.text
    elif method is not m and not explicit_weights:
        weights = method.default_weights(n)
    return plan("merge", list(has), decided, method.name, params, weights)
