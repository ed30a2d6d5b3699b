"""`weightsmith convert | inspect | verify`: LoRA formats, Flux -> Chroma, and what ComfyUI would load."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..dtypes import OUTPUT_DTYPE_CHOICES, dtype_name, parse_dtype
from ..errors import BadFileError, MismatchError, WeightsmithError
from ..lora.convert import convert_lora
from ..lora.formats import (
    FORMATS,
    LORA_ARCHES,
    WRITABLE_FORMATS,
    detect_format,
    load_lora,
    lora_state_dict,
    lora_summary,
    save_lora,
)
from ..lora.model import LoRA
from ..lora.reproject import REPROJECT_METHODS
from ..lora.svd import OPTIMAL_MEANS
from ..paths import check_new_output, check_output_suffix, refuse_input_target
from ..report import an_arch, format_table, write_json
from ..sources import open_model
from ._roles import has_adapter_keys


class UsageError(WeightsmithError):
    """Options that do not go together."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a LoRA to another format and/or to Chroma (exact, no base model)")
    p.add_argument("input", type=Path, help="LoRA file (any known format: " + ", ".join(FORMATS) + ")")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--to", default="comfy", choices=WRITABLE_FORMATS, help="output format (default: comfy)")
    p.add_argument("--target-arch", default=None, choices=LORA_ARCHES,
                   help="retarget the LoRA (flux -> chroma drops the modulation layers Chroma lacks)")
    p.add_argument("--arch", default=None, choices=LORA_ARCHES, help="architecture of the input (default: detect)")
    p.add_argument("--dtype", default="keep", choices=OUTPUT_DTYPE_CHOICES, help="output dtype (default: keep)")
    p.add_argument("--report", type=Path, default=None, help="write the conversion report as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--to-type", default="keep", choices=("keep", "lora"),
                   help="keep: every adapter type as it is (LoKr stays LoKr); lora: LoKr / LoHa / DoRA / full diffs "
                        "become plain LoRA pairs of rank --rank (or the smallest meeting --error), optimally")
    p.add_argument("--error", type=float, default=None,
                   help="with --to-type lora: relative error target per layer instead of a fixed --rank")
    p.add_argument("--base", type=Path, default=None,
                   help="with --to-type lora: the base model, needed for DoRA modules (their change depends on it)")
    g = p.add_argument_group("re-project (opt-in, Flux -> Chroma through both base models, then re-extraction)")
    g.add_argument("--reproject", default=None, choices=REPROJECT_METHODS,
                   help="reshape each kept layer's change with the bases instead of the exact remap")
    g.add_argument("--flux-base", type=Path, help="the Flux model the LoRA was trained on")
    g.add_argument("--chroma-base", type=Path, help="the Chroma model to convert to")
    g.add_argument("--rank", type=int, default=32,
                   help="rank of the re-extracted LoRA, and of --to-type lora (default 32)")
    g.add_argument("--strength", type=float, default=1.0, help="LoRA strength, applied once before the method")
    g.add_argument("--seed", type=int, default=0, help="seed of the comparative mask and the randomized SVD")
    g.add_argument("--alpha", type=float, default=0.5, help="comparative: weight exponent 1/alpha - 1")
    g.add_argument("--beta", type=float, default=0.0, help="1 = difference weight / keep dissimilar features")
    g.add_argument("--gamma", type=float, default=1.0, help="comparative: 0 Bernoulli .. 1 soft mask; dissimilar: exponent")
    g.add_argument("--multiplier", type=float, default=1.0, help="add_dissimilar: scale of the result")
    p.set_defaults(func=run_convert)

    p = sub.add_parser("inspect", help="show a LoRA's architecture, format, modules and ranks (or a model's layout)")
    p.add_argument("file", type=Path)
    p.add_argument("--modules", action="store_true", help="list every module with its rank")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    p.set_defaults(func=run_inspect)

    p = sub.add_parser("verify", help="list the keys of a LoRA that ComfyUI would not load (exit 1 if any)")
    p.add_argument("lora", type=Path)
    p.add_argument("--arch", required=True, choices=LORA_ARCHES, help="the model family it is meant for")
    p.add_argument("--model", type=Path, default=None,
                   help="check against this model file's layout instead of the full-size architecture")
    p.set_defaults(func=run_verify)


# --- convert ---------------------------------------------------------------------------------------


def run_convert(args: argparse.Namespace) -> int:
    check_output_suffix(args.output)
    refuse_input_target(args.output, [args.input])
    if args.report:  # an output too: a bad path (an input, an existing file) fails before any work
        check_new_output(args.report, "report", protect=[args.input], others=[args.output])
    lora = load_lora(args.input, arch=args.arch)
    if args.reproject:
        if args.target_arch != "chroma" or not (args.flux_base and args.chroma_base):
            raise UsageError("--reproject needs --target-arch chroma, --flux-base and --chroma-base")
        from ..lora.reproject import ReprojectOptions, reproject_flux_to_chroma
        from ..progress import TerminalProgress

        opts = ReprojectOptions(args.reproject, args.rank, args.strength, args.alpha, args.beta, args.gamma,
                                args.multiplier, args.seed)
        converted, report = reproject_flux_to_chroma(lora, args.flux_base, args.chroma_base, opts,
                                                     progress=TerminalProgress("re-project"))
    else:
        try:
            converted, report = convert_lora(lora, args.target_arch)
        except MismatchError as e:  # the core speaks of "the LoRA"; here the user needs to know which file
            raise MismatchError(f"{args.input}: {e}") from None
    layers = []
    if args.to_type == "lora":
        converted, layers = _to_lowrank(converted, args)
    out = save_lora(converted, args.output, fmt=args.to, dtype=parse_dtype(args.dtype), protect=[args.input],
                    overwrite=args.overwrite)
    print(f"{args.input.name}: {lora.source_format} {lora.arch} LoRA, {len(lora.modules)} modules")
    print(report.text())
    print(f"wrote {out} ({args.to}, {converted.arch}, {len(converted.modules)} modules)")
    if args.report:
        write_json(args.report, {"input": str(args.input), "output": str(out), "input_format": lora.source_format,
                                 "output_format": args.to, **report.to_dict(),
                                 **({"to_lora_layers": layers} if args.to_type == "lora" else {})})
    return 0


def _to_lowrank(lora: LoRA, args: argparse.Namespace) -> tuple[LoRA, list[dict]]:
    from ..lora.adapters.to_lowrank import lora_to_lowrank
    from ..lora.svd import RankPolicy

    policy = RankPolicy("error", error=args.error) if args.error is not None else RankPolicy("fixed", rank=args.rank)
    base = None
    if args.base is not None:
        from ..sources import diffusion_view

        base = diffusion_view(open_model(args.base))
    try:
        out, layers = lora_to_lowrank(lora, policy, base=base)
    except MismatchError as e:
        raise MismatchError(f"{args.input}: {e}") from None
    if layers:
        rows = [{"module": r["module"], "type": r["type"], "rank": r["rank"], "error": f"{r['rel_error']:.4f}",
                 "optimum": f"{r['optimal_rel_error']:.4f}" + ("" if r["optimal_is_exact"] else " (bound)"),
                 "method": r["method"]} for r in layers]
        print(format_table(rows, title=f"to plain LoRA: {len(layers)} layers (relative Frobenius error vs the "
                                       "optimal rank-r error)"))
        print(f"note: {OPTIMAL_MEANS}.")
    return out, layers


# --- inspect ---------------------------------------------------------------------------------------


def module_rows(lora: LoRA) -> list[dict]:
    rows = []
    for name in sorted(lora.modules):
        m = lora.modules[name]
        kinds = [k for k, v in (("diff", m.diff), ("diff_b", m.diff_b), ("set", m.set_weight)) if v is not None]
        parts = [*m.terms, *m.adapters]
        rows.append({"module": name, "type": "+".join(m.types()), "terms": len(parts),
                     "rank": ",".join(str(p.rank) for p in parts if p.rank is not None) or "-",
                     "alpha": ",".join(f"{p.alpha:g}" for p in parts if p.alpha is not None) or "-",
                     "scale": ",".join(f"{p.scale:.4g}" for p in parts) or "-",
                     "slices": ",".join(f"{p.rows[0]}+{p.rows[1]}" for p in parts if p.rows) or "-",
                     "other": ",".join(kinds) or "-"})
    return rows


def _inspect_model(path: Path) -> dict:
    from ..arch import detect_arch
    from ..dtypes import itemsize
    from ..sources import classify_keys, diffusion_layout

    src = open_model(path)
    info = detect_arch(src)
    groups: dict[str, list[int]] = {}
    encodings: dict[str, dict[str, int]] = {}  # part -> encoding label or "plain <dtype>" -> keys
    dtypes: dict[str, int] = {}  # stored dtypes (an encoded weight counts its payload's)
    for key, group in classify_keys(src.keys()).items():
        i = src.info(key)
        enc = src.encoding(key)
        stored = enc.stored_dtype if enc is not None else i.dtype
        g = groups.setdefault(group, [0, 0, 0])
        g[0] += 1
        g[1] += i.numel
        g[2] += i.numel * itemsize(stored)
        label = enc.label if enc is not None else f"plain {dtype_name(i.dtype)}"
        part = encodings.setdefault(group, {})
        part[label] = part.get(label, 0) + 1
        dtypes[dtype_name(stored)] = dtypes.get(dtype_name(stored), 0) + 1
    print(f"{path}: full model, {info}")
    if info.reason:
        print(f"  {info.reason}")
    layout = diffusion_layout(src.keys())
    if layout.note():
        print(f"note: {layout.note()}")
    try:
        layout.check(str(path))
    except BadFileError as e:  # inspect describes; every command that reads the model refuses it
        print(f"WARNING: {e}")
    rows = [{"part": g, "tensors": v[0], "parameters": v[1], "MB": round(v[2] / 2**20, 1)} for g, v in sorted(groups.items())]
    print(format_table(rows, ["part", "tensors", "parameters", "MB"]))
    print("dtypes: " + ", ".join(f"{d} ({n})" for d, n in sorted(dtypes.items())))
    quantized = {p: {k: n for k, n in e.items() if not k.startswith("plain ")} for p, e in encodings.items()}
    for part, encs in sorted(quantized.items()):
        if encs:
            print(f"encoding of {part}: " + ", ".join(f"{k} ({n} layers)" for k, n in encs.items())
                  + " — read decoded (fp32) by every command")
    return {"kind": "model", "arch": info.arch, "naming": info.naming, "prefix": info.prefix, **info.details,
            "parts": {r["part"]: r for r in rows}, "dtypes": dtypes, "encodings": encodings}


def run_inspect(args: argparse.Namespace) -> int:
    if args.json:
        check_new_output(args.json, "JSON summary", protect=[args.file])
    src = open_model(args.file)
    from ..arch import detect_arch

    for note in src.notes:  # where in a trainer's checkpoint the tensors were found
        print(f"note: {note}")
    if not src.keys():  # a valid header with no tensor in it: neither a model nor a LoRA
        print(f"{args.file}: empty: a valid file that holds no tensors (an export or download that wrote only "
              "the header?); nothing to inspect: re-export or download it again")
        data: dict = {"kind": "empty"}
    # a full checkpoint's `model.diffusion_model.` keys also look like ComfyUI LoRA keys: a model is a model; so is
    # a file of plain weights no adapter suffix marks (an unknown model: explained, not read as a LoRA)
    elif detect_format(src.keys()) == "unknown" or detect_arch(src).arch != "unknown" or not has_adapter_keys(src.keys()):
        data = _inspect_model(args.file)
    else:
        lora = load_lora(src)
        data = {"kind": "lora", **lora_summary(lora)}
        print(f"{args.file}: {lora.arch} LoRA in {lora.source_format} format")
        print(format_table([{k: v for k, v in data.items() if k not in ("unknown_key_names", "kind")}]))
        if args.modules:
            print(format_table(module_rows(lora), title="modules"))
        if lora.unknown_keys:
            print(f"{len(lora.unknown_keys)} keys not understood (kept out of conversions):")
            for k in lora.unknown_keys[:20]:
                print(f"  {k}")
            if len(lora.unknown_keys) > 20:
                print(f"  … and {len(lora.unknown_keys) - 20} more")
        if src.nonfinite_keys:  # inspect is the place to scan values; load/convert only remap them
            print(f"WARNING: {len(src.nonfinite_keys)} tensors hold NaN or Inf: " + ", ".join(src.nonfinite_keys[:8]))
        data["nonfinite_keys"] = list(src.nonfinite_keys)
        data["modules_detail"] = module_rows(lora)
    data["notes"] = list(src.notes)
    data["provenance"] = _show_provenance(src.metadata)
    if args.json:
        write_json(args.json, data)
    return 0


def _show_provenance(meta: dict[str, str]) -> dict:
    """Print how the file was made (modelspec keys, the weightsmith recipe); return it for --json."""
    from ..provenance import describe, read_recipe

    for line in describe(meta):
        print(line)
    return {"modelspec": {k: v for k, v in meta.items() if k.startswith("modelspec.")},
            "training_keys": {k: v for k, v in meta.items() if k.startswith("ss_")}, "recipe": read_recipe(meta)}


# --- verify ----------------------------------------------------------------------------------------


def run_verify(args: argparse.Namespace) -> int:
    from ._comfy_verify import verify

    src = open_model(args.lora)
    sd = {k: src.get(k) for k in src.keys()}
    shapes = None
    if args.model is not None:
        from ..sources import diffusion_view

        model = diffusion_view(open_model(args.model))
        shapes = {k: model.info(k).shape for k in model.keys()}
        if not shapes:
            raise BadFileError(f"{args.model}: holds no tensors; give the model file the LoRA is for")
    if detect_format(sd) == "unknown":
        raise BadFileError(f"{args.lora}: not a LoRA in any known format; give a LoRA file "
                           "(`weightsmith inspect` shows what a file holds)")
    load_lora(src)  # a malformed LoRA (factors that do not pair, odd alphas) is refused by our reader, named
    result = verify(sd, args.arch, shapes, lora_name=str(args.lora), model_name=str(args.model))
    missing, bad = result["not_loaded"], result["shape_errors"]
    print(f"{args.lora}: ComfyUI maps {result['loaded']} patches for {args.arch}; "
          f"{len(missing)} keys not loaded, {len(bad)} shape mismatches")
    for k in missing:
        print(f"  not loaded: {k}")
    for b in bad:
        print(f"  shape: {b}")
    if missing or bad:
        for hint in verify_hints(load_lora(src), args, result, shapes):
            print(f"hint: {hint}")
        return 1
    print("OK: every key loads")
    return 0


def verify_hints(lora: LoRA, args: argparse.Namespace, result: dict, shapes) -> list[str]:
    """What to do about the keys ComfyUI would not load, by their cause: a LoRA of another architecture
    (no conversion helps), layers of other sizes (another model size or variant: none helps either), or
    keys a conversion maps onto the model — offered only when the converted LoRA, verified the same way,
    loads fully."""
    from ._comfy_verify import verify

    against = f"{args.model}" if args.model is not None else f"the full-size {args.arch} layout"
    retarget = lora.arch == "flux" and args.arch == "chroma"  # the one pair a conversion bridges
    if lora.arch not in ("unknown", args.arch) and not retarget:
        return [f"{args.lora} is {an_arch(lora.arch)} LoRA, not {an_arch(args.arch)} one: its layers do not exist in "
                f"{an_arch(args.arch)} model and no conversion changes that (only Flux -> Chroma can be converted). Use "
                f"it with {an_arch(lora.arch)} model; `weightsmith verify {args.lora} --arch {lora.arch}` checks it there"]
    hints = []
    if result["shape_errors"]:
        hints.append(f"{len(result['shape_errors'])} modules have other sizes than the layers they patch in {against}: "
                     "the LoRA was trained for a model of another size or variant, and a conversion keeps every size. "
                     "Use it with the model it was trained on" + ("" if args.model is not None else
                                                                  "; check it against that file with --model"))
    if not result["not_loaded"]:
        return hints
    try:
        converted, report = convert_lora(lora, "chroma" if retarget else None)
        fixed = verify(lora_state_dict(converted, "comfy"), args.arch, shapes, lora_name=str(args.lora),
                       model_name=str(args.model))
    except WeightsmithError:  # a module the comfy format cannot carry, a file ComfyUI's loader fails on
        fixed = None
    if fixed is not None and not fixed["not_loaded"] and not fixed["shape_errors"]:
        dropped = (f" (it drops the {len(report.dropped)} Flux modulation layers Chroma does not have; "
                   "they cannot act on Chroma)" if report.dropped else "")
        hints.append(f"`weightsmith convert {args.lora} -o fixed.safetensors --to comfy"
                     + (" --target-arch chroma" if retarget else "") + f"` writes a file ComfyUI loads fully{dropped}")
    else:
        left = len(fixed["not_loaded"]) if fixed is not None else len(result["not_loaded"])
        hints.append(f"{left} keys name layers {against} does not have, in any format this tool writes, so no "
                     f"conversion makes them load: the LoRA was made for another model variant, or these keys are "
                     "not LoRA weights. `weightsmith inspect --modules` lists what it holds")
    return hints


__all__ = ["register", "lora_state_dict"]
