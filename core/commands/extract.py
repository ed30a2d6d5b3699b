"""`weightsmith extract` (two models → LoRA + reconstruction report) and `weightsmith validate` (the same
report for any LoRA file against the fine-tune it claims to reproduce)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..devices import resolve_device
from ..errors import OutputPathError
from ..estimate_work import extract_estimate
from ..lora.budget import parse_size
from ..lora.extract import DEFAULT_MIN_DELTA, SAME_AS_RANK, conv_rank_option, extract_lora
from ..lora.formats import WRITABLE_FORMATS, check_writable, save_lora
from ..lora.svd import METHODS, RANK_MODES, OptionError
from ..lora.validate import MISSING_POLICIES, ReconstructionReport, pair_models, validate_lora
from ..paths import check_name_fits, check_new_output, check_output_suffix, refuse_input_target
from ..progress import TerminalProgress
from ..report import save_png, write_json
from ..sources import as_source
from ._roles import check_roles


def _positive_or_none(text: str) -> int | None:
    value = int(text)
    return None if value <= 0 else value


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--missing", choices=MISSING_POLICIES, default="auto",
                   help="tensors only one model has: skip (use the shared ones, list the rest), error, or auto "
                        "(default: skip between related bases such as Flux dev/schnell, error otherwise)")
    p.add_argument("--device", default="cpu", help="where the math runs: cpu, cuda, cuda:1 … (default cpu)")
    p.add_argument("--report", type=Path, help="write the full report (summary, blocks, modules) as JSON")
    p.add_argument("--chart", type=Path, help="write the error-per-block chart as PNG")
    p.add_argument("--modules", action="store_true", help="print the per-module table too")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="extract a LoRA from a base and a fine-tuned model, with a reconstruction report",
                       description="ΔW = TUNED − BASE per layer, factorised (randomized SVD when the rank is small, "
                                   "exact otherwise). alpha = rank (scale 1). Neither model is loaded whole.")
    p.add_argument("base", help="base model (.safetensors, sharded folder, index.json or .ckpt)")
    p.add_argument("tuned", help="the fine-tune of BASE")
    p.add_argument("-o", "--output", required=True, type=Path, help="output LoRA .safetensors")
    p.add_argument("--rank", type=int, default=64, help="rank of linear layers (fixed mode; default 64)")
    p.add_argument("--conv-rank", type=int, default=SAME_AS_RANK,
                   help="rank of k×k convolutions: -1 (default) = the same as --rank, 0 leaves them out (as the "
                        "node's conv_rank)")
    p.add_argument("--rank-mode", choices=RANK_MODES, default=None,
                   help="fixed (default): --rank; energy: smallest rank keeping --energy of |dW|^2; error: smallest "
                        "rank with relative error <= --error; full: exact, every direction; budget: ranks allocated "
                        "across layers for a file of --size (implied by --size); sv_ratio / sv_fro / sv_cumulative: "
                        "kohya's dynamic modes with --dynamic-param")
    p.add_argument("--size", type=parse_size, default=None,
                   help="size of the LoRA file, e.g. 100MB or 1.5GiB: ranks are allocated across all layers to "
                        "minimise the total error for that size (rank mode budget; --max-rank caps each layer)")
    p.add_argument("--dynamic-param", type=float, default=None,
                   help="kohya's --dynamic_param for the sv_* modes: sv_ratio keeps σ > σ1/PARAM; sv_fro keeps a "
                        "Frobenius fraction PARAM; sv_cumulative a fraction PARAM of Σσ")
    p.add_argument("--energy", type=float, default=0.99, help="energy to keep in energy mode (default 0.99)")
    p.add_argument("--error", type=float, default=0.05, help="relative error target in error mode (default 0.05)")
    p.add_argument("--max-rank", type=_positive_or_none, default=None, help="per-layer rank cap for every mode")
    p.add_argument("--min-delta", type=float, default=DEFAULT_MIN_DELTA,
                   help="skip layers with |dW|/|W| below this (default %(default)g)")
    p.add_argument("--no-diff", dest="store_diff", action="store_false",
                   help="leave out 1-D weights and biases (stored as full diffs by default)")
    p.add_argument("--clamp-quantile", type=float, default=None,
                   help="clamp factor entries at this quantile of their magnitudes (e.g. 0.99; off by default: it adds error)")
    p.add_argument("--method", choices=METHODS, default="auto", help="SVD method (auto picks per layer)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the stored factors")
    p.add_argument("--format", default="comfy", choices=WRITABLE_FORMATS,
                   help="file format (comfy: diffusion_model.*.lora_up/down/alpha; kohya: lora_unet_*)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD (results are deterministic)")
    p.add_argument("--plan-only", action="store_true",
                   help="print the estimate (output size, free disk, peak RAM, VRAM, time) and stop; nothing is read "
                        "beyond the headers, nothing is written")
    _report_args(p)
    p.set_defaults(func=run_extract)

    v = sub.add_parser("validate", help="how well a LoRA reproduces TUNED − BASE (works for any tool's LoRA)")
    v.add_argument("base", help="base model the fine-tune started from")
    v.add_argument("tuned", help="the fine-tune the LoRA should reproduce")
    v.add_argument("lora", help="LoRA file in any format `weightsmith inspect` recognises")
    v.add_argument("--strength", type=float, default=1.0, help="strength to apply the LoRA at (default 1)")
    _report_args(v)
    v.set_defaults(func=run_validate)


def _emit(report: ReconstructionReport, args: argparse.Namespace) -> None:
    print(report.text(per_module=args.modules))
    if args.report:
        write_json(args.report, report.to_dict())
        print(f"report: {args.report}")
    if args.chart and report.modules:
        save_png(report.chart(), args.chart)
        print(f"chart: {args.chart}")


def _check_outputs(args: argparse.Namespace, inputs: list, output: Path | None = None) -> None:
    """Refuse bad --report / --chart paths and a missing GPU before any tensor is read (the final writes
    refuse them again, atomically)."""
    resolve_device(args.device)
    for what, path in (("report", args.report), ("chart", args.chart)):
        if path is not None:
            others = [output] + [p for w, p in (("report", args.report), ("chart", args.chart)) if w != what]
            check_new_output(path, what, protect=inputs, others=others)


def run_extract(args: argparse.Namespace) -> int:
    check_output_suffix(args.output)
    check_name_fits(args.output)
    if args.output.exists():  # checked before the work; the writer refuses it again, atomically
        raise OutputPathError(f"{args.output}: exists; choose another name or remove it")
    if not args.output.parent.is_dir():
        raise OutputPathError(f"folder {args.output.parent} does not exist; create it or choose another path "
                              f"for {args.output.name}")
    check_roles("extract", [("base", args.base), ("tuned", args.tuned)])
    rank_mode = args.rank_mode or ("budget" if args.size is not None else "fixed")
    if args.size is not None and rank_mode != "budget":
        raise OptionError(f"--size allocates ranks for a file size (rank mode budget); it does not go with "
                          f"--rank-mode {rank_mode}: leave one of them out")
    base, tuned = as_source(args.base), as_source(args.tuned)
    _check_outputs(args, [*base.paths(), *tuned.paths()], args.output)
    refuse_input_target(args.output, [*base.paths(), *tuned.paths()])
    settings = dict(rank=args.rank, conv_rank=conv_rank_option(args.conv_rank), rank_mode=rank_mode, energy=args.energy,
                    error=args.error, max_rank=args.max_rank, min_delta=args.min_delta, store_diff=args.store_diff,
                    clamp_quantile=args.clamp_quantile, dtype=args.dtype, method=args.method, seed=args.seed,
                    missing=args.missing, dynamic_param=args.dynamic_param, size=args.size)
    est = extract_estimate(pair_models(base, tuned, args.missing), settings, resolve_device(args.device), args.output)
    print(est.text())
    est.check_disk()  # refused before any tensor is read, --plan-only too
    if args.plan_only:
        return 0
    lora, report = extract_lora(base, tuned, device=args.device, progress=TerminalProgress("extract"), **settings)
    for src in (base, tuned):  # where in a checkpoint the tensors were found, stray keys read as the model's
        for note in src.notes:
            print(f"note: {Path(src.name).name}: {note}")
    # the message Save LoRA gives for the same LoRA; before the report, so a refusal leaves no file at all
    check_writable(lora, args.format)
    _emit(report, args)
    if not lora.modules:
        print("no LoRA written: it would be empty")
        return 1
    path = save_lora(lora, args.output, fmt=args.format, protect=[*base.paths(), *tuned.paths()])
    print(f"wrote {path} ({args.format}, {len(lora.modules)} modules)")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    _check_outputs(args, [args.base, args.tuned, args.lora])
    check_roles("validate", [("base", args.base), ("tuned", args.tuned), ("lora", args.lora)], lora_slot="lora")
    report = validate_lora(args.base, args.tuned, args.lora, device=args.device, strength=args.strength,
                           progress=TerminalProgress("validate"), missing=args.missing)
    _emit(report, args)
    if report.orphans:
        print(f"{len(report.orphans)} LoRA modules target nothing in these models: {', '.join(report.orphans[:5])}")
    return 0
