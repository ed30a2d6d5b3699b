"""`weightsmith compose` (several LoRAs with strengths into one) and `weightsmith rerank` (one LoRA to a
lower rank), both through the canonical LoRA: any input format in, the chosen format out."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..dtypes import FP8_DTYPES, dtype_name, parse_dtype
from ..errors import MismatchError
from ..estimate_work import compose_estimate
from ..lora.budget import parse_size
from ..paths import check_new_output, check_output_suffix, refuse_input_target
from ..progress import TerminalProgress
from ..report import write_json

OUTPUT_FORMATS = ("comfy", "kohya", "diffusers", "onetrainer")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, type=Path, help="output .safetensors file (never overwrites an input)")
    p.add_argument("--rank", type=int, default=None, help="re-compress every module to at most this rank (optimal, from the factors)")
    p.add_argument("--energy", type=float, default=None,
                   help="re-compress keeping this fraction of each module's energy Σσ² (e.g. 0.99); with --rank, the smaller rank")
    p.add_argument("--size", type=parse_size, default=None,
                   help="size of the output file, e.g. 50MB: ranks allocated across modules to minimise the total "
                        "error for that size (optimal per module, from the factors); --rank then caps each module")
    p.add_argument("--plan-only", action="store_true",
                   help="print the estimate (output size, free disk, peak RAM, time) and stop; nothing is written")
    p.add_argument("--format", default="comfy", choices=OUTPUT_FORMATS, help="key format of the output (default: comfy)")
    p.add_argument("--dtype", default="auto",
                   help="dtype of the stored factors: auto (the widest input dtype), fp32, bf16 or fp16. Exact mode "
                        "builds bf16/fp32 factors directly in it: unscaled factors copied bit for bit, scaled ones "
                        "rounded once")
    p.add_argument("--device", default="cpu", help="device for the math (cpu, cuda, cuda:1 …)")
    p.add_argument("--report", type=Path, default=None, help="write the per-module report as JSON here")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compose",
        help="compose several LoRAs with strengths into one (exact, or re-compressed with --rank/--energy)",
        description="Compose LoRAs: `weightsmith compose A.safetensors:0.8 B.safetensors:0.6 -o OUT.safetensors` "
        "(or nunchaku's spelling `-i A B -s 0.8 0.6 -o OUT`). Exact by default: the output applied at "
        "strength 1 equals applying every input with its strength.",
    )
    p.add_argument("loras", nargs="*", metavar="LORA[:STRENGTH]", help="input LoRA files, each with an optional :strength (default 1)")
    p.add_argument("-i", "--inputs", nargs="+", default=[], metavar="LORA", help="input LoRA files (nunchaku spelling)")
    p.add_argument("-s", "--strengths", nargs="+", type=float, default=None, metavar="S",
                   help="strengths for --inputs, in the same order (default 1 each)")
    p.add_argument("--target-arch", default=None, choices=["chroma"],
                   help="convert Flux inputs to Chroma first (drops the modulation layers Chroma does not have)")
    p.add_argument("--warn-rank", type=int, default=256, help="warn when a composed module's rank exceeds this (default 256)")
    _add_output_options(p)
    p.set_defaults(func=run_compose)

    r = sub.add_parser("rerank", help="reduce a LoRA to a lower rank (optimal per module, from its factors alone)")
    r.add_argument("input", type=Path, help="input LoRA file")
    _add_output_options(r)
    r.set_defaults(func=run_rerank)


def parse_inputs(positional: list[str], inputs: list[str], strengths: list[float] | None) -> list[tuple[Path, float]]:
    """(path, strength) pairs from `A.safetensors:0.8` items and/or `-i A B -s 0.8 0.6`."""
    out = []
    for item in positional:
        path, strength = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and not Path(item).exists():
            try:
                path, strength = head, float(tail)
            except ValueError:
                path = item
        out.append((Path(path), strength))
    if strengths is not None and len(strengths) != len(inputs):
        raise MismatchError(f"-i gives {len(inputs)} LoRA(s) but -s gives {len(strengths)} strength(s); give one per LoRA")
    out += [(Path(p), s) for p, s in zip(inputs, strengths or [1.0] * len(inputs))]
    if not out:
        raise MismatchError("no input LoRAs: give `A.safetensors:0.8 B.safetensors:0.6` or `-i A B -s 0.8 0.6`")
    return out


def _factor_dtype(loras) -> torch.dtype:
    """The widest dtype the inputs store their factors in (what `--dtype auto` writes). fp8 factors count
    as bf16, which holds every fp8 value exactly (torch has no promotion rules for fp8, nor fp8 math)."""
    dtype = None
    for lora in loras:
        for m in lora.modules.values():
            for t in m.terms:
                d = torch.bfloat16 if t.up.dtype in FP8_DTYPES else t.up.dtype
                dtype = d if dtype is None else torch.promote_types(dtype, d)
    return dtype or torch.float32


def _output_dtype(arg: str, loras) -> torch.dtype:
    if arg == "auto":
        return _factor_dtype(loras)
    try:
        return parse_dtype(arg)
    except ValueError as e:
        raise MismatchError(str(e)) from None


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MismatchError(f"--device {device}: no CUDA device is available here; use --device cpu")


def _check_report_path(args: argparse.Namespace, inputs: list[Path]) -> None:
    """-o and --report are checked before any work: a name we would not write (`out.ckpt`), an input, an
    existing report."""
    check_output_suffix(args.output)
    refuse_input_target(args.output, inputs)
    if args.report:
        check_new_output(args.report, "report", protect=inputs, others=[args.output])


def _check_storable(lora, fmt: str, dtype: torch.dtype, inputs: list[Path]) -> None:
    """Refuse to write values the output dtype turns into inf (e.g. re-compressed factors of a large
    strength stored as fp16). compose_loras already refused or reported what is not finite in fp32, so
    only dtypes of a narrower range (fp16, fp8) can add inf here, and only they pay for this check (one
    extra state dict and a sum per tensor); bf16 shares fp32's exponent range. Values that are already
    non-finite in fp32 came from the inputs and are reported by the compose report."""
    if torch.finfo(dtype).max > 1e38:  # fp32, bf16, fp64
        return
    from ..dtypes import all_finite
    from ..lora.formats import lora_state_dict

    stored = lora_state_dict(lora, fmt, dtype)
    bad = [k for k, t in stored.items() if not all_finite(t)]
    del stored
    if not bad:
        return
    exact = lora_state_dict(lora, fmt, None)  # the composed values (fp32, or the inputs' dtype), before the cast
    overflowed = [k for k in bad if all_finite(exact[k])]
    if overflowed:
        limit = max(float(exact[k].float().abs().max()) for k in overflowed)
        raise MismatchError(
            f"composing {', '.join(p.name for p in inputs)}: {len(overflowed)} tensor(s) (e.g. {overflowed[0]!r}) hold "
            f"values up to {limit:.3g}, beyond {dtype_name(dtype)}'s range (±{torch.finfo(dtype).max:.6g}): they "
            "would be written as inf. Use --dtype fp32 (or bf16), or smaller strengths; nothing was written")


def _finish(lora, report, args, inputs: list[Path], dtype: torch.dtype) -> int:
    from ..lora.formats import save_lora

    _check_storable(lora, args.format, dtype, inputs)
    path = save_lora(lora, args.output, fmt=args.format, dtype=dtype, metadata=lora.metadata, protect=inputs)
    print(report.text(limit=20))
    if args.report:
        write_json(args.report, report.to_dict())
        print(f"report: {args.report}")
    print(f"wrote {path}")
    return 0


def _estimated(args: argparse.Namespace, loras, dtype: torch.dtype, inputs: list[Path], operation: str) -> bool:
    """Print the estimate and refuse an output that does not fit on its disk; True with --plan-only."""
    if args.size is not None and args.energy is not None:
        raise MismatchError("--size and --energy do not go together: give one of them")
    est = compose_estimate(loras, args.rank, args.energy, args.size, dtype, args.device, args.output, inputs,
                           operation)
    print(est.text())
    est.check_disk()  # before anything is written, --plan-only too
    return bool(args.plan_only)


def run_compose(args: argparse.Namespace) -> int:
    from ..lora.compose import compose_loras
    from ..lora.formats import load_lora

    _check_device(args.device)
    pairs = parse_inputs(args.loras, args.inputs, args.strengths)
    _check_report_path(args, [p for p, _ in pairs])
    loras = [load_lora(p) for p, _ in pairs]
    if args.target_arch == "chroma":
        from ..lora.convert import flux_to_chroma

        for i, lora in enumerate(loras):
            if lora.arch.startswith("flux"):
                loras[i], conv = flux_to_chroma(lora)
                print(f"{pairs[i][0].name}: converted to Chroma ({conv})")
    dtype = _output_dtype(args.dtype, loras)  # a bad --dtype fails before any work; exact mode builds in it
    if _estimated(args, loras, dtype, [p for p, _ in pairs], "compose"):
        return 0
    lora, report = compose_loras(
        [(lo, s) for lo, (_, s) in zip(loras, pairs)], rank=args.rank, energy=args.energy, warn_rank=args.warn_rank,
        names=[p.name for p, _ in pairs], device=args.device, progress=TerminalProgress("compose"), dtype=dtype,
        size=args.size,
    )
    return _finish(lora, report, args, [p for p, _ in pairs], dtype)


def run_rerank(args: argparse.Namespace) -> int:
    from ..lora.compose import rerank_lora
    from ..lora.formats import load_lora

    if args.rank is None and args.energy is None and args.size is None:
        raise MismatchError("rerank needs --rank R, --energy E or --size SIZE")
    _check_device(args.device)
    _check_report_path(args, [args.input])
    source = load_lora(args.input)
    dtype = _output_dtype(args.dtype, [source])  # a bad --dtype fails before any work
    if _estimated(args, [source], dtype, [args.input], "rerank"):
        return 0
    lora, report = rerank_lora(source, rank=args.rank, energy=args.energy, device=args.device,
                               progress=TerminalProgress("rerank"), name=args.input.name, size=args.size, dtype=dtype)
    return _finish(lora, report, args, [args.input], dtype)
