"""Shared machinery of the LoRA format readers and writers (the registry lives here too).

Reading is three steps: group a file's keys by module prefix and role (up, down, alpha, diff, …) using
the format's suffix table; resolve each prefix to a canonical target (module, optional row slice, optional
half swap); assemble the canonical `LoRA`. Keys that match no suffix or whose prefix resolves to nothing go
to `lora.unknown_keys` by name.

Writing is the reverse: each canonical module is named by the format (possibly as several row slices);
the terms falling in each slice are fused into one (up, down, alpha) pair, exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import BadFileError, MismatchError
from ..safetensors_io import REFETCH
from ..sources import TensorSource
from . import keymaps
from .adapters import ADAPTER_SUFFIXES, build_adapter
from .factors import fuse_terms, pad_rows, slice_term, swap_halves
from .model import LoRA, LoraTerm, ModuleDelta

RESHAPE_META = "weightsmith.reshape"  # JSON {module: [out, in]}: weights a LoRA widens (BFL control img_in)


@dataclass(frozen=True)
class Target:
    """Where a file module lands in the canonical LoRA."""

    module: str  # canonical module name
    rows: tuple[int, int] | None = None  # (start, length) in units of H; H = the file tensor's rows / length
    swap: bool = False  # halves swapped relative to canonical


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[list[str]], int]  # how strongly the keys look like this format (0 = not at all)
    read: Callable[[TensorSource, str | None], LoRA]
    write: Callable[[LoRA, torch.dtype | None], dict[str, torch.Tensor]] | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # writable formats: how the writer names a LoRA's modules (`namer(lora)(module, arch)`), so what it cannot
    # hold is known before any tensor is touched (`unwritable_modules`)
    namer: Callable[[LoRA], Callable[[str, str], list[OutName]]] | None = None
    # how strongly keys match when a file's metadata says this format wrote it (default: `detect`); OneTrainer
    # names SD UNets as kohya does, so only the recorded word can tell its SD files apart
    detect_recorded: Callable[[list[str]], int] | None = None


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


# ---------------------------------------------------------------------------------------------------
# Reading

Suffixes = list[tuple[str, str]]  # (key suffix, role); longest suffix wins

KOHYA_SUFFIXES: Suffixes = [
    (".lora_up.weight", "up"), (".lora_down.weight", "down"), (".alpha", "alpha"), (".diff", "diff"),
    (".diff_b", "diff_b"), (".set_weight", "set"), (".reshape_weight", "reshape"),
]
PEFT_SUFFIXES: Suffixes = [
    (".lora_B.weight", "up"), (".lora_A.weight", "down"), (".lora_B.bias", "diff_b"), (".alpha", "alpha"),
    (".lora_B.default.weight", "up"), (".lora_A.default.weight", "down"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"), ("_lora.up.weight", "up"), ("_lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
    (".diff", "diff"), (".diff_b", "diff_b"), (".set_weight", "set"), (".reshape_weight", "reshape"),
]
# LoKr / LoHa / LoCon-Tucker / DoRA / norm-diff keys: the same suffixes under every naming
KOHYA_SUFFIXES += ADAPTER_SUFFIXES
PEFT_SUFFIXES += ADAPTER_SUFFIXES


def group_keys(keys: list[str], suffixes: Suffixes) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{prefix: {role: key}} and the keys no suffix matched."""
    ordered = sorted(suffixes, key=lambda s: -len(s[0]))
    groups: dict[str, dict[str, str]] = {}
    rest: list[str] = []
    for k in keys:
        for suf, role in ordered:
            if k.endswith(suf) and len(k) > len(suf):
                prefix = k[: -len(suf)]
                slot = groups.setdefault(prefix, {})
                if role in slot:  # two spellings of one tensor: keep the first, report the other
                    rest.append(k)
                else:
                    slot[role] = k
                break
        else:
            rest.append(k)
    return groups, rest


def _as_float(t: torch.Tensor, key: str, src: TensorSource) -> float:
    if t.numel() != 1:
        raise BadFileError(f"{src.name}: {key!r} should be a scalar alpha, has shape {tuple(t.shape)}; {REFETCH}")
    value = float(t.float().item())
    if not math.isfinite(value):  # every value of the module's change would be NaN/Inf
        raise BadFileError(f"{src.name}: alpha {key!r} is {value}, not a finite number, so the module's whole change "
                           f"would be {value}: the file is damaged; {REFETCH}")
    return value


def _check_factors(src: TensorSource, roles: dict[str, str], up: torch.Tensor, down: torch.Tensor) -> None:
    """An up/down pair every consumer can multiply: floating point, non-empty, up's columns = down's rows."""
    for role, t in (("up", up), ("down", down)):
        if not t.is_floating_point():
            raise BadFileError(f"{src.name}: LoRA factor {roles[role]!r} holds {str(t.dtype).replace('torch.', '')} "
                               f"values; LoRA factors are floating point: the file is damaged or not a LoRA; {REFETCH}")
    if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
        raise BadFileError(
            f"{src.name}: {roles['up']!r} {tuple(up.shape)} and {roles['down']!r} {tuple(down.shape)} "
            f"are not a LoRA pair (up's columns must equal down's rows); {REFETCH}"
        )
    if not up.numel() or not down.numel():
        raise BadFileError(f"{src.name}: {roles['up']!r} {tuple(up.shape)} and {roles['down']!r} {tuple(down.shape)} "
                           f"hold no values (rank {down.shape[0]}): an empty LoRA pair; {REFETCH}")


def _reshape_shape(t: torch.Tensor, key: str, src: TensorSource) -> list[int]:
    """A `.reshape_weight` tensor: the weight shape a control LoRA widens a layer to (a few positive ints)."""
    values = t.flatten().tolist() if t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) else []
    if not 1 <= len(values) <= 8 or not all(0 < v < 2**31 for v in values):
        raise BadFileError(f"{src.name}: {key!r} should hold a weight shape (a few positive integers), not "
                           f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}; {REFETCH}")
    return [int(v) for v in values]


def reshape_hints(metadata: dict[str, str], where: str) -> dict[str, list[int]]:
    """The `weightsmith.reshape` metadata ({module: [out, in]}), checked: it comes from the file."""
    text = metadata.get(RESHAPE_META)
    if text is None:
        return {}
    try:
        hints = json.loads(text)
    except (ValueError, RecursionError):
        hints = None
    if not isinstance(hints, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and v and all(type(x) is int and 0 < x < 2**31 for x in v)
        for k, v in hints.items()
    ):
        raise BadFileError(f"{where}: metadata {RESHAPE_META!r} should map module names to weight shapes such as "
                           f'{{"diffusion_model.img_in": [3072, 128]}}, not {text[:80]!r}; {REFETCH}')
    return hints


def assemble(
    src: TensorSource,
    groups: dict[str, dict[str, str]],
    resolve: Callable[[str], Target | None],
    lora: LoRA,
    alpha_of: Callable[[str, int], float | None] | None = None,
) -> None:
    """Turn grouped keys into canonical module deltas (in place); unresolvable groups -> unknown_keys."""
    reshape = reshape_hints(lora.metadata, src.name)
    for prefix, roles in groups.items():
        target = resolve(prefix)
        if target is None or (("up" in roles) != ("down" in roles)):
            lora.unknown_keys.extend(roles.values())
            continue
        t = {role: src.get(key) for role, key in roles.items()}
        mod = lora.module(target.module)
        if _adapter_roles(roles):
            _assemble_adapter(src, prefix, roles, t, target, mod, lora)
        elif "up" in t:
            up, down = t["up"], t["down"]
            _check_factors(src, roles, up, down)
            alpha = _as_float(t["alpha"], roles["alpha"], src) if "alpha" in t else None
            if alpha is None and alpha_of is not None:  # PEFT: lora_alpha / r from the file's metadata
                alpha = alpha_of(prefix, int(down.shape[0]))
            if target.swap:
                up = swap_halves(up)
            mod.terms.append(LoraTerm(up=up, down=down, alpha=alpha, rows=_abs_rows(target, up.shape[0])))
        elif "alpha" in t and not ({"diff", "diff_b", "set"} & t.keys()):
            lora.unknown_keys.append(roles["alpha"])
        if "dora" in t and not _adapter_roles(roles):  # a magnitude with no adapter: ComfyUI uses it nowhere
            lora.unknown_keys.append(roles["dora"])
        for role in ("diff", "diff_b"):
            if role not in t:
                continue
            v = swap_halves(t[role]) if target.swap else t[role]
            if target.rows is not None:
                rows = _abs_rows(target, v.shape[0])
                v = pad_rows(v, rows, _total_rows(target, rows))
            cur = getattr(mod, role)
            setattr(mod, role, v if cur is None else cur.float() + v.float())
        if "set" in t:
            if target.rows is not None:
                lora.unknown_keys.append(roles["set"])
            else:
                mod.set_weight = t["set"]
        if "reshape" in t:
            reshape[target.module] = _reshape_shape(t["reshape"], roles["reshape"], src)
    if reshape:
        lora.metadata[RESHAPE_META] = json.dumps(reshape, sort_keys=True)
    for name in [n for n, m in lora.modules.items() if m.is_empty()]:
        del lora.modules[name]


def check_modules(lora: LoRA, where: str) -> None:
    """Each module's parts agree with one another, as one weight's change must: diffs, bias diffs and
    replacements are non-empty floats, a bias diff is 1-D, and diffs and factors describe one shape."""
    for name, mod in lora.modules.items():
        parts = [(r, v) for r, v in (("diff", mod.diff), ("diff_b", mod.diff_b), ("set_weight", mod.set_weight))
                 if v is not None]
        for role, v in parts:
            if not v.is_floating_point() or not v.numel() or (role == "diff_b" and v.ndim != 1):
                what = ("holds no values" if not v.numel() else f"is {str(v.dtype).replace('torch.', '')}"
                        if not v.is_floating_point() else f"has shape {tuple(v.shape)}, not a bias change")
                raise BadFileError(f"{where}: module {name!r}: its {role} {what}; {REFETCH}")
        widths = {tuple(t.down.shape[1:]) for t in mod.terms}
        if len(widths) > 1:
            raise BadFileError(f"{where}: module {name!r}: its factor pairs take inputs of different shapes "
                               f"{sorted(widths)}; {REFETCH}")
        if not mod.terms:  # a diff-only module's shape is the model's to judge (validate, apply)
            continue
        try:
            rows = module_rows(name, mod)
        except MismatchError:
            continue
        cols = math.prod(next(iter(widths))) if widths else None
        for role, v in parts:
            want = rows if role == "diff_b" else rows * cols if cols is not None else None
            if want is not None and v.numel() != want:
                raise BadFileError(f"{where}: module {name!r}: its {role} has shape {tuple(v.shape)} but its factors "
                                   f"make a change of {rows} rows x {cols} columns; {REFETCH}")
        for t in mod.terms:
            if t.rows is not None and t.rows[0] + t.rows[1] > rows:
                raise BadFileError(f"{where}: module {name!r}: factor rows {t.rows[0]}..{sum(t.rows)} lie beyond "
                                   f"the weight's {rows} rows; {REFETCH}")


def _adapter_roles(roles: dict[str, str]) -> bool:
    """True when a file module is a LoKr / LoHa, or a LoRA pair with a DoRA magnitude or a Tucker core."""
    return any(":" in r for r in roles) or ("dora" in roles and "up" in roles and "down" in roles)


def _assemble_adapter(src: TensorSource, prefix: str, roles: dict[str, str], t: dict[str, torch.Tensor],
                      target: Target, mod: ModuleDelta, lora: LoRA) -> None:
    """One adapter for a file module. Like ComfyUI, which tries LoRA, LoHa, LoKr in turn and keeps the
    last that matches, a module holding several kinds is that last kind; the others' keys are reported."""
    kinds = {r.split(":")[0] for r in roles if ":" in r}
    kind = "lokr" if "lokr" in kinds else "loha" if "loha" in kinds else "lora"
    parts = {r.split(":")[1]: t[r] for r in roles if r.startswith(kind + ":")}
    if kind == "lora":
        if "up" not in t:  # a Tucker core without its pair
            lora.unknown_keys.extend(roles[r] for r in roles if r.startswith("lora:"))
            return
        parts.update(up=t["up"], down=t["down"])
    shadowed = [k for r, k in roles.items() if (":" in r and not r.startswith(kind + ":"))
                or (kind != "lora" and r in ("up", "down"))]
    lora.unknown_keys.extend(shadowed)
    alpha = _as_float(t["alpha"], roles["alpha"], src) if "alpha" in t else None
    adapter = build_adapter(prefix, kind, parts, alpha, t.get("dora"), src.name)
    if target.swap:
        adapter = adapter.swapped()
    adapter.rows = _abs_rows(target, adapter.out_rows)
    mod.adapters.append(adapter)


def _abs_rows(target: Target, piece_rows: int) -> tuple[int, int] | None:
    if target.rows is None:
        return None
    start, length = target.rows
    h = piece_rows // length
    return (start * h, length * h)


def _total_rows(target: Target, rows: tuple[int, int]) -> int:
    h = rows[1] // target.rows[1]
    leaf = target.module.rsplit(".", 1)[-1]
    return keymaps.FUSED_ROWS.get(leaf, 1) * h


# ---------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class OutName:
    """How a writer names (a slice of) a canonical module."""

    prefix: str
    rows: tuple[int, int] | None = None  # (start, length) in units of H of the canonical module
    swap: bool = False
    split: bool = False  # the loader maps this prefix to a slice/function: it cannot take a bias diff
    up: str | None = None  # suffix overrides for this name (old diffusers attention: `_lora.up.weight`)
    down: str | None = None


@dataclass(frozen=True)
class WriteStyle:
    up: str  # key suffix of the up factor
    down: str
    alpha: str = "keep"  # keep: write alpha when set; always: write alpha (rank when unset); bake: fold into up
    adapters: bool = True  # the naming can carry LoKr / LoHa / DoRA keys (diffusers/PEFT loaders cannot)


def hidden_of(mod: ModuleDelta) -> int | None:
    """Input width of a module (H for fused Flux weights), from its factors or diffs."""
    for t in mod.terms:
        return int(t.down.shape[1])
    if mod.diff is not None and mod.diff.ndim > 1:
        return int(mod.diff.shape[1])
    for a in mod.adapters:
        return a.in_features
    return None


def module_rows(name: str, mod: ModuleDelta) -> int:
    """Total rows of the module's weight: a whole-weight part tells it; only row slices of a fused weight fall
    back to Flux's fused layout (Flux.2's linear1 is wider: 9·H, told by its whole-weight factors)."""
    for t in mod.terms:
        if t.rows is None:
            return int(t.up.shape[0])
    for a in mod.adapters:
        if a.rows is None:
            return a.out_rows
    for v in (mod.diff, mod.diff_b, mod.set_weight):
        if v is not None:
            return int(v.shape[0])
    h = hidden_of(mod)
    if h is not None:
        fused = keymaps.fused_rows(name, h)
        if fused is not None:
            return fused
    raise MismatchError(f"module {name}: cannot tell its number of rows (only partial-row terms on a non-fused weight)")


def _cast(t: torch.Tensor, dtype: torch.dtype | None, like: torch.Tensor) -> torch.Tensor:
    from ..dtypes import cast_for_output

    target = dtype or (like.dtype if like.is_floating_point() else torch.float32)
    return cast_for_output(t, target).contiguous()


def emit_module(
    out: dict[str, torch.Tensor],
    name: str,
    mod: ModuleDelta,
    names: list[OutName],
    style: WriteStyle,
    dtype: torch.dtype | None,
    fmt: str,
    reshape: dict[str, list[int]],
) -> None:
    """Write one canonical module under the format's names (one, or one per row slice)."""
    total = module_rows(name, mod)
    sliced = any(n.rows is not None for n in names)
    h = total // keymaps.FUSED_ROWS.get(name.rsplit(".", 1)[-1], 1) if sliced else total
    placed = _place_adapters(name, mod, names, total, h, style, fmt)
    for n in names:
        start, length = (0, total) if n.rows is None else (n.rows[0] * h, n.rows[1] * h)
        pieces = [p for p in (slice_term(t, start, length) for t in mod.terms) if p is not None]
        adapter = placed.get(n.prefix)
        if adapter is not None:
            _check_alone(name, n, pieces, mod, start, length, fmt)
            _emit_adapter(out, n, adapter, dtype)
        if pieces:
            up, down, alpha = fuse_terms(pieces, length)
            like = mod.terms[0].up
            if style.alpha == "bake":
                up = up.float() * (1.0 if alpha is None else alpha / down.shape[0])
                alpha = None
            elif style.alpha == "always" and alpha is None:
                alpha = float(down.shape[0])
            if n.swap:
                up = swap_halves(up)
            out[n.prefix + (n.up or style.up)] = _cast(up, dtype, like)
            out[n.prefix + (n.down or style.down)] = _cast(down, dtype, mod.terms[0].down)
            if alpha is not None:
                out[n.prefix + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        for role, suffix in (("diff", ".diff"), ("diff_b", ".diff_b")):
            v = getattr(mod, role)
            if v is None:
                continue
            piece = v[start : start + length]
            if not piece.abs().sum() and n.rows is not None:
                continue  # a slice the diff does not touch
            if n.swap:
                piece = swap_halves(piece)
            out[n.prefix + suffix] = _cast(piece, dtype, v)
        if mod.set_weight is not None:
            out[n.prefix + ".set_weight"] = _cast(mod.set_weight, dtype, mod.set_weight)
        if name in reshape and n is names[0]:
            out[n.prefix + ".reshape_weight"] = torch.tensor(reshape[name], dtype=torch.int64)


def _place_adapters(name: str, mod: ModuleDelta, names: list[OutName], total: int, h: int, style: WriteStyle,
                    fmt: str) -> dict[str, object]:
    """{output prefix: adapter}: each adapter goes under the name whose rows are exactly its rows."""
    if not mod.adapters:
        return {}
    kinds = ", ".join(dict.fromkeys(a.kind + (" with DoRA" if not a.is_linear else "") for a in mod.adapters))
    if not style.adapters:
        raise MismatchError(f"module {name}: the {fmt} format cannot carry a {kinds} adapter (diffusers/PEFT loaders "
                            "read LoRA pairs only); save it as comfy, kohya or lycoris, which keep the type, or turn "
                            "it into a plain LoRA (`weightsmith convert --to-type lora --rank R`)")
    placed: dict[str, object] = {}
    for a in mod.adapters:
        rows = a.rows or (0, total)
        hit = [n for n in names if ((0, total) if n.rows is None else (n.rows[0] * h, n.rows[1] * h)) == rows]
        if not hit:
            raise MismatchError(f"module {name}: its {a.kind} adapter covers rows {rows[0]}..{rows[0] + rows[1]} of the "
                                f"weight, which the {fmt} format has no name for (it names "
                                + ("the whole weight" if all(n.rows is None for n in names) else "other slices")
                                + "); save it with the naming it was read in (lycoris / onetrainer split q/k/v), or "
                                "turn it into a plain LoRA (`weightsmith convert --to-type lora --rank R`)")
        if hit[0].prefix in placed:
            raise MismatchError(f"module {name}: two adapters on the same weight ({placed[hit[0].prefix].kind} and "
                                f"{a.kind}); one file holds one per weight (ComfyUI keeps the last): compose them "
                                "(`weightsmith compose`) into one exact full diff, or to a plain LoRA with --rank")
        placed[hit[0].prefix] = a
    return placed


def _check_alone(name: str, n: OutName, pieces: list, mod: ModuleDelta, start: int, length: int, fmt: str) -> None:
    other = "a LoRA pair" if pieces else ("a full diff" if mod.diff is not None and bool(
        mod.diff[start : start + length].abs().sum()) else None)
    if other is None and mod.set_weight is not None:
        other = "a replacement (set_weight)"
    if other:
        raise MismatchError(f"module {name}: {n.prefix} would hold both an adapter and {other}; one {fmt} file "
                            "holds one patch per weight (ComfyUI keeps the last): compose the module "
                            "(`weightsmith compose`) into one exact full diff, or to a plain LoRA with --rank")


def _emit_adapter(out: dict[str, torch.Tensor], n: OutName, adapter, dtype: torch.dtype | None) -> None:
    if n.swap:
        adapter = adapter.swapped()
    stored = adapter.tensors()
    for suffix, t in adapter.file_tensors().items():
        out[n.prefix + suffix] = _cast(t, dtype, stored[suffix])
    if adapter.alpha is not None:
        out[n.prefix + ".alpha"] = torch.tensor(float(adapter.alpha), dtype=torch.float32)
    if adapter.dora_scale is not None:
        out[n.prefix + ".dora_scale"] = _cast(adapter.dora_scale, dtype, adapter.dora_scale)


def km_layout(lora: LoRA) -> str:
    return keymaps.sd_layout(lora.arch, lora.metadata)


# Per architecture, why a module has no name in a format although a trainer may write one: (module, fmt) -> str
NO_NAME_WHY: dict[str, Callable[[str, str], str | None]] = {}


def whole_shape(name: str, mod: ModuleDelta) -> tuple[int, int] | None:
    """(rows, input width) of the weight `mod` changes, where its parts tell both (None otherwise)."""
    h = hidden_of(mod)
    try:
        return (module_rows(name, mod), h) if h is not None else None
    except MismatchError:
        return None


def unwritable_reason(mod: ModuleDelta, names: list[OutName], fmt: str, module: str = "", arch: str = "") -> str | None:
    """Why a format named `names` cannot hold module `mod` whole (None: it can)."""
    if not names:
        why = NO_NAME_WHY.get(arch)
        return (why(module, fmt) if why else None) or f"no {fmt} name"
    if mod.diff_b is not None and any(n.split for n in names):
        return "a bias change on a fused weight this format splits"
    if mod.set_weight is not None and any(n.rows is not None for n in names):
        return "a replacement of a fused weight this format splits"
    return None


def unwritable_in(lora: LoRA, fmt: str) -> dict[str, str]:
    """{module: why} for every module of `lora` the writable format `fmt` cannot hold; {} when it holds all."""
    namer = FORMATS[fmt].namer(lora)
    out = {}
    for name in sorted(lora.modules):
        mod = lora.modules[name]
        if not mod.is_empty() and (why := unwritable_reason(mod, namer(name, lora.arch), fmt, name, lora.arch)):
            out[name] = why
    return out


def _adapter_problem(name: str, mod: ModuleDelta, names: list[OutName], style: WriteStyle, fmt: str) -> str | None:
    """Why the format cannot place `mod`'s LoKr/LoHa/DoRA adapters (None: it can, or there are none)."""
    if not mod.adapters:
        return None
    total = module_rows(name, mod)
    h = total // keymaps.FUSED_ROWS.get(name.rsplit(".", 1)[-1], 1) if any(n.rows is not None for n in names) else total
    try:
        _place_adapters(name, mod, names, total, h, style, fmt)
    except MismatchError as e:
        return str(e).removeprefix(f"module {name}: ")
    return None


def _diff_only(mod: ModuleDelta, why: str) -> bool:
    """Whether leaving out full diffs of 1-D weights and bias changes (extraction's store_diff off) removes
    the problem: a bias change, or a module that is only a full diff."""
    return why.startswith("a bias change") or (not mod.terms and not mod.adapters and mod.set_weight is None
                                                and mod.diff is not None and mod.diff.ndim < 2)


class UnwritableError(MismatchError):
    """A LoRA format cannot hold some modules of a LoRA: nothing is written, the modules are named."""

    def __init__(self, message: str, modules: dict[str, str]):
        super().__init__(message)
        self.modules = modules


def unwritable_error(lora: LoRA, fmt: str, problems: dict[str, str]) -> UnwritableError:
    """One message for every writer and entry point: which modules, why, and how to proceed."""
    shown = ", ".join(f"{n} ({why})" for n, why in list(problems.items())[:8])
    more = f", … ({len(problems)} in all)" if len(problems) > 8 else ""
    holders = [f for f, spec in FORMATS.items() if spec.namer is not None and f != fmt and not unwritable_in(lora, f)]
    holders = holders or ["comfy"]
    named = ", ".join(holders[:-1]) + " or " + holders[-1] if len(holders) > 1 else holders[0]
    advice = f"use the {named} format, which holds every module"
    if all(_diff_only(lora.modules[n], why) for n, why in problems.items()):
        advice += (", or leave these changes out: they are full changes of 1-D weights and bias changes, which an "
                   "extraction stores with store_diff on (turn store_diff off in Extract LoRA, or give "
                   "`weightsmith extract --no-diff`)")
    layout = (f" (SD names follow the {km_layout(lora)} UNet layout; a LoRA for another layout records it in the "
              f"metadata key {keymaps.SD_LAYOUT_META})" if lora.arch in ("sd15", "sdxl") and any(
                  why.startswith("no ") for why in problems.values()) else "")
    return UnwritableError(
        f"the {fmt} format cannot hold {len(problems)} module(s) of this {lora.arch} LoRA: {shown}{more}{layout}; "
        f"nothing was written: {advice}", problems)


def write_with(
    lora: LoRA,
    dtype: torch.dtype | None,
    namer: Callable[[str, str], list[OutName]],
    style: WriteStyle,
    fmt: str,
) -> dict[str, torch.Tensor]:
    """Every module through `namer(module, arch)`; if the format cannot hold some module whole, nothing is
    emitted and UnwritableError names them all."""
    out: dict[str, torch.Tensor] = {}
    reshape = reshape_hints(lora.metadata, "the LoRA")
    plan, problems = [], {}
    for name in sorted(lora.modules):
        mod = lora.modules[name]
        if mod.is_empty():
            continue
        names = namer(name, lora.arch)
        why = unwritable_reason(mod, names, fmt, name, lora.arch) or _adapter_problem(name, mod, names, style, fmt)
        if why:
            problems[name] = why
        plan.append((name, mod, names))
    if problems:
        raise unwritable_error(lora, fmt, problems)
    for name, mod, names in plan:
        emit_module(out, name, mod, names, style, dtype, fmt, reshape)
    return out


# ---------------------------------------------------------------------------------------------------
# Architecture clues from raw keys (needed before names can be mapped: SD diffusers names depend on it)

_SDXL_CLUES = ("add_embedding", "label_emb", "text_encoder_2.", "lora_te2_text_model", "clip_g.")
_SD15_CLUES = ("down_blocks_0_attentions", "down_blocks.0.attentions", "input_blocks_1_1_", "input_blocks.1.1.",
               "down_blocks_3_", "down_blocks.3.")


def guess_sd_arch(src: TensorSource, hint: str | None) -> str:
    """'sd15' or 'sdxl' for a LoRA on an SD UNet (its layout decides what diffusers names mean)."""
    if hint in ("sd15", "sdxl"):
        return hint
    keys = src.keys()
    lay = src.metadata.get(keymaps.SD_LAYOUT_META, "")
    if lay.startswith(("sd15/", "sdxl/")):
        return lay.split("/", 1)[0]
    if any(c in k for k in keys for c in _SDXL_CLUES):
        return "sdxl"
    if any(c in k for k in keys for c in _SD15_CLUES):
        return "sd15"
    for k in keys:  # cross-attention key width is the text context: 768 (SD1.5) or 2048 (SDXL)
        if "attn2" in k and "to_k" in k and ("down" in k.rsplit("to_k", 1)[1] or "lora_A" in k):
            width = src.info(k).shape[1] if len(src.info(k).shape) > 1 else 0
            if width in (768, 2048):
                return "sd15" if width == 768 else "sdxl"
    return "sd15"


def sd_layout_of(src: TensorSource, hint: str | None) -> str:
    arch = guess_sd_arch(src, hint)
    return keymaps.sd_layout(arch, src.metadata)


def new_lora(src: TensorSource, fmt: str) -> LoRA:
    meta = dict(src.metadata)
    return LoRA(arch="unknown", source_format=fmt, metadata=meta)
