"""Per-key merge rules: ordered `REGEX=ACTION` lines, key-group aliases and named presets.

A rule's regex is searched (`re.search`) in the key name without the checkpoint prefix, e.g.
`double_blocks.0.img_attn.qkv.weight` or `input_blocks.4.1.proj_in.weight`. Instead of a regex, a rule
may name a key group with `@alias` (`@double`, `@single.3`, `@img`, `@guidance`, `@in.4`, `@mid`, …;
`group_aliases()` lists them).

ACTION is one of
  * a method name, optionally with parameters: `ties`, `dare(drop_rate=0.9, seed=7)`
  * `take:A` / `take:2` — the tensor of that input as it is (inputs are lettered A, B, C… or numbered 1..N)
  * `take:first` — from the first input that has the key (e.g. the guidance embedder of a dev model)
  * `drop` — leave the key out of the output
  * `weight:0.7,0.3` — other weights for the matching keys (the method stays)

Rules are tried in order and the first match wins, separately for the choice of method/take/drop and
for weights, so `@double=weight:0.7,0.3` and `@img=ties` can both apply to one key. Preset rules come
after the user's own, so the user's rules override them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import WeightsmithError
from .methods import METHODS, get_method

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def input_label(i: int) -> str:
    return LETTERS[i] if i < len(LETTERS) else f"#{i + 1}"


@dataclass(frozen=True)
class InputNames:
    """How messages name the inputs and tell the user to add or remove one: the CLI's files are 'model C',
    a node's sockets 'model_c'."""

    name: Callable[[int], str]
    given: str  # "given" / "connected"
    add: str  # "give" / "connect a model to"
    remove: str  # "leave out" / "disconnect"

    def names(self, indices) -> str:
        return ", ".join(self.name(i) for i in indices)


CLI_INPUT_NAMES = InputNames(lambda i: f"model {input_label(i)}", "given", "give", "leave out")


class InputCountError(WeightsmithError):
    """A method or rule needs an input that is not there (add_difference with two models, `take:C` with A and
    B only), or gets more than it takes. The message names the inputs the way the caller does: `renamed`
    rewrites it for a node's sockets."""

    def __init__(self, build: Callable[[InputNames], str], names: InputNames = CLI_INPUT_NAMES):
        self.build = build
        super().__init__(build(names))

    def renamed(self, names: InputNames) -> InputCountError:
        return InputCountError(self.build, names)


def parse_input_ref(text: str, what: str = "input") -> int:
    """'A'/'b'/'1'/'2' -> 0-based input index."""
    t = str(text).strip()
    if len(t) == 1 and t.upper() in LETTERS:
        return LETTERS.index(t.upper())
    try:
        n = int(t)
    except ValueError:
        raise WeightsmithError(f"{what} {text!r}: name an input by letter (A, B, …) or number (1, 2, …)") from None
    if n < 1:
        raise WeightsmithError(f"{what} {text!r}: inputs are numbered from 1 (or lettered from A)")
    return n - 1


# --------------------------------------------------------------------------------------------------
# Key-group aliases: one regex for BFL/ComfyUI, diffusers and LDM names alike.

_GROUPS: dict[str, tuple[str, str]] = {
    # Flux / Chroma
    "double": (r"^(double_blocks|transformer_blocks|double_stream_blocks)\.", "Flux / Flux.2 / HiDream double-stream blocks"),
    "single": (r"^(single_blocks|single_transformer_blocks|single_stream_blocks)\.",
               "Flux / Flux.2 / HiDream single-stream blocks"),
    "img": (r"^joint_blocks\.\d+\.x_block\.|^double_stream_blocks\.\d+\.block\.(attn1\.(to_q|to_k|to_v|to_out|q_rms_norm"
            r"|k_rms_norm)\.|ff_i\.)|^double_blocks\.\d+\.img_|^transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out|norm_q|norm_k)\.|norm1\.|ff\."
            r"|img_)", "image stream of the double blocks (Flux, Flux.2, HiDream; Qwen-Image's and SD3's blocks)"),
    "txt": (r"^joint_blocks\.\d+\.context_block\.|^double_stream_blocks\.\d+\.block\.(attn1\.\w+_t\.|ff_t\.)"
            r"|^double_blocks\.\d+\.txt_|^transformer_blocks\.\d+\.(attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out|"
            r"norm_added_q|norm_added_k)\.|norm1_context\.|ff_context\.|txt_)",
            "text stream of the double blocks (Flux, Flux.2, HiDream; Qwen-Image's and SD3's blocks)"),
    # Qwen-Image and Wan 2.1/2.2
    "blocks": (r"^(blocks|transformer_blocks|layers|joint_blocks)\.",
               "Wan / Qwen-Image / Lumina 2 / Z-Image transformer blocks, SD3 joint blocks"),
    "experts": (r"^(double|single)_stream_blocks\.\d+\.block\.ff_i\.", "HiDream's mixture-of-experts feed-forwards"),
    "refiners": (r"^(noise_refiner|context_refiner)\.", "Lumina 2 / Z-Image image and caption refiner blocks"),
    "cross": (r"^blocks\.\d+\.cross_attn\.", "Wan cross-attention (text and image conditioning)"),
    "modulation": (r"^(double_stream_modulation_(img|txt)|single_stream_modulation)\.",
                   "Flux.2's shared modulations (one per stream, for all blocks)"),
    "guidance": (r"^(guidance_in|time_text_embed\.guidance_embedder|time_guidance_embed\.guidance_embedder)\.",
                 "Flux-dev / Flux.2 guidance embedder"),
    "time": (r"^(time_in|time_(text|guidance)_embed\.timestep_embedder|time_embed|time_embedding)\.", "timestep embedder"),
    "vector": (r"^(vector_in|time_text_embed\.text_embedder)\.", "pooled-text (vector) embedder"),
    "embedders": (r"^(time_in|vector_in|guidance_in|time_text_embed)\.", "time, vector and guidance embedders"),
    "io": (r"^(img_in|txt_in|final_layer|x_embedder|context_embedder|norm_out|proj_out)\.",
           "Flux input projections and final layer"),
    "approximator": (r"^distilled_guidance_layer\.", "Chroma's modulation approximator"),
    # SD1.5 / SDXL UNets (LDM and diffusers names)
    "in": (r"^(input_blocks|down_blocks)\.", "UNet input (down) blocks"),
    "mid": (r"^(middle_block|mid_block)\.", "UNet middle block"),
    "out": (r"^(output_blocks|up_blocks)\.", "UNet output (up) blocks"),
    "label": (r"^(label_emb|add_embedding)\.", "SDXL size/pooled-text embedding"),
    "final": (r"^(out|conv_out|conv_norm_out)\.", "UNet output head"),
}
# aliases that take a block number: @double.3 …
_NUMBERED = {"double": ("double_blocks", "transformer_blocks|double_stream_blocks"),
             "single": ("single_blocks", "single_transformer_blocks|single_stream_blocks"),
             "in": ("input_blocks", "down_blocks"), "out": ("output_blocks", "up_blocks"),
             "blocks": ("blocks", "transformer_blocks|layers|joint_blocks")}


def group_aliases() -> list[dict]:
    rows = [{"alias": "@" + k, "regex": r, "meaning": d} for k, (r, d) in _GROUPS.items()]
    rows += [{"alias": f"@{k}.N", "regex": rf"^({a}|{b})\.N\.", "meaning": f"block N of {_GROUPS[k][1]}"}
             for k, (a, b) in _NUMBERED.items()]
    return rows


def expand_alias(pattern: str) -> str:
    """'@double' -> its regex; '@single.3' -> block 3; anything else is returned unchanged."""
    if not pattern.startswith("@"):
        return pattern
    name = pattern[1:]
    if name in _GROUPS:
        return _GROUPS[name][0]
    m = re.fullmatch(r"([a-z]+)\.(\d+)", name)
    if m and m.group(1) in _NUMBERED:
        a, b = _NUMBERED[m.group(1)]
        return rf"^({a}|{b})\.{int(m.group(2))}\."
    known = ", ".join("@" + k for k in _GROUPS) + ", " + ", ".join(f"@{k}.N" for k in _NUMBERED)
    raise WeightsmithError(f"unknown key group {pattern!r}; known groups: {known}")


# --------------------------------------------------------------------------------------------------
# Presets: named rule lists.

PRESETS: dict[str, tuple[str, list[str]]] = {
    "flux-guidance-keep": (
        "guidance embedder from the first model that has one: dev + schnell stays a dev-family model",
        ["@guidance=take:first"],
    ),
    "flux-guidance-drop": (
        "leave the guidance embedder out: the output is a schnell-family model",
        ["@guidance=drop"],
    ),
    "flux-embedders-from-a": (
        "time/vector embedders from A (guidance from whichever model has one); blocks merged",
        ["@guidance=take:first", "@embedders=take:A"],
    ),
    "flux-double-from-a": ("double-stream blocks from A, the rest merged", ["@double=take:A"]),
    "flux-single-from-a": ("single-stream blocks from A, the rest merged", ["@single=take:A"]),
    "sd-in-from-a": ("UNet input blocks (composition) from A, the rest merged", ["@in=take:A"]),
    "sd-out-from-a": ("UNet output blocks (detail, style) from A, the rest merged", ["@out=take:A"]),
    "sd-mid-from-a": ("UNet middle block from A, the rest merged", ["@mid=take:A"]),
}


def preset_rules(names) -> list[str]:
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for n in names:
        n = (n or "").strip()
        if not n or n == "none":
            continue
        if n not in PRESETS:
            raise WeightsmithError(f"unknown preset {n!r}; choose one of {', '.join(PRESETS)}")
        out.extend(PRESETS[n][1])
    return out


# --------------------------------------------------------------------------------------------------
# Parsing

_ACTION = re.compile(r"^\s*(take:\s*\S+|drop|weights?:\s*[-+0-9.eE,\s]+|[A-Za-z_][A-Za-z0-9_]*\s*(\(.*\))?)\s*$")


@dataclass(frozen=True)
class Rule:
    text: str  # as the user wrote it
    pattern: str  # the regex (aliases expanded)
    kind: str  # "method" | "take" | "drop" | "weight"
    method: str | None = None
    params: dict = field(default_factory=dict)
    take: int | None = None  # input index; None with kind "take" = first input that has the key
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "_regex", re.compile(self.pattern))

    def matches(self, name: str) -> bool:
        return self._regex.search(name) is not None  # type: ignore[attr-defined]

    def describe(self) -> str:
        if self.kind == "method":
            p = ", ".join(f"{k}={v}" for k, v in self.params.items())  # as written (base stays 'A' / '2')
            return f"{self.method}({p})" if p else str(self.method)
        if self.kind == "take":
            return "take from the first input that has it" if self.take is None else f"take from {input_label(self.take)}"
        if self.kind == "weight":
            return "weights " + ",".join(f"{w:g}" for w in self.weights or ())
        return "drop"


def parse_value(text: str):
    """'0.3' -> 0.3, '7' -> 7, 'true'/'false' -> bool, 'A' stays a string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t.strip("'\"")


def parse_params(text: str, what: str = "parameters") -> dict:
    """'alpha=0.3, seed=7' -> {'alpha': 0.3, 'seed': 7} (commas or newlines separate)."""
    out = {}
    for part in re.split(r"[,\n;]", text or ""):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise WeightsmithError(f"{what}: {part!r} is not NAME=VALUE")
        k, v = part.split("=", 1)
        k = k.strip()
        # an input reference stays text ('A', '2'): the planner reads it as a letter or 1-based number,
        # while a Python int given through the API is a 0-based index
        out[k] = v.strip() if k == "base" else parse_value(v)
    return out


def parse_weights(text: str | list | tuple | None, what: str = "weights") -> list[float] | None:
    """'0.7,0.3' (or a list) -> [0.7, 0.3]; empty -> None (method default). NaN/inf and all-zero weights are
    refused here, before any file is read: they would write NaN or all-zero tensors."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [s for s in re.split(r"[,\s]+", text.strip()) if s]
    if not items:
        return None
    try:
        weights = [float(x) for x in items]
    except (TypeError, ValueError):
        raise WeightsmithError(f"{what} {text!r}: give numbers separated by commas, e.g. 0.7,0.3") from None
    shown = ",".join(f"{w:g}" for w in weights)
    if bad := [w for w in weights if not math.isfinite(w)]:
        raise WeightsmithError(f"{what} {shown}: {bad[0]:g} is not a finite number, so every merged tensor would be "
                               "NaN or inf; give finite weights, e.g. 0.7,0.3")
    if not any(weights):
        raise WeightsmithError(f"{what} {shown}: every weight is 0, so the merged tensors would be all zeros (or 0/0); "
                               "give at least one weight that is not 0, e.g. 0.5,0.5")
    return weights


def _parse_action(action: str, text: str) -> dict:
    a = action.strip()
    if a == "drop":
        return {"kind": "drop"}
    if a.startswith("take:"):
        ref = a[5:].strip()
        if ref.lower() == "first":
            return {"kind": "take", "take": None}
        return {"kind": "take", "take": parse_input_ref(ref, f"rule {text!r}: take")}
    if a.startswith(("weight:", "weights:")):
        return {"kind": "weight", "weights": tuple(parse_weights(a.split(":", 1)[1], f"rule {text!r}") or ())}
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?", a)
    if not m:
        raise WeightsmithError(f"rule {text!r}: cannot read the action {a!r}")
    method = get_method(m.group(1)).name
    params = parse_params(m.group(2) or "", f"rule {text!r}")
    unknown = set(params) - set(METHODS[method].defaults)
    if unknown:
        raise WeightsmithError(f"rule {text!r}: {method} has no parameter {', '.join(sorted(unknown))} "
                               f"(it takes {', '.join(METHODS[method].defaults) or 'none'})")
    return {"kind": "method", "method": method, "params": params}


def parse_rule(text: str | Rule) -> Rule:
    """'REGEX=ACTION' -> Rule. The split is at the first '=' whose right side is a valid action, so a
    regex may contain '=' and an action may carry 'name=value' parameters."""
    if isinstance(text, Rule):
        return text
    s = text.strip()
    for m in re.finditer("=", s):
        left, right = s[: m.start()].strip(), s[m.end():]
        if left and _ACTION.match(right):
            pattern = expand_alias(left)
            try:
                re.compile(pattern)
            except re.error as e:
                raise WeightsmithError(f"rule {text!r}: bad regex {left!r}: {e}") from None
            return Rule(text=s, pattern=pattern, **_parse_action(right, s))
    raise WeightsmithError(
        f"rule {text!r}: expected REGEX=ACTION with ACTION a method, take:A|take:first, drop or weight:w1,w2"
    )


def parse_rule_lines(lines, parse: Callable, rule_type: type) -> list:
    """Rules from a list, or from multiline text (blank lines and '#' comments ignored); items already
    parsed (instances of `rule_type`) are kept. Shared by merge rules and bake's strength rules."""
    if lines is None:
        return []
    if isinstance(lines, str):
        lines = lines.splitlines()
    out = []
    for line in lines:
        if isinstance(line, rule_type):
            out.append(line)
        elif line.strip() and not line.strip().startswith("#"):
            out.append(parse(line.strip()))
    return out


def parse_rules(lines) -> list[Rule]:
    """Rules from a list, or from multiline text (blank lines and '#' comments ignored)."""
    return parse_rule_lines(lines, parse_rule, Rule)


def resolve(name: str, rules: list[Rule]) -> tuple[Rule | None, Rule | None]:
    """(first matching method/take/drop rule, first matching weight rule) for one key name."""
    action = weight = None
    for r in rules:
        if r.kind == "weight":
            if weight is None and r.matches(name):
                weight = r
        elif action is None and r.matches(name):
            action = r
        if action is not None and weight is not None:
            break
    return action, weight
