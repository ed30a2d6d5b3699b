"""`weightsmith bake MODEL LORA[:STRENGTH] … -o OUT`: LoRAs baked into a model file, streaming."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bake import execute_bake, plan_bake
from ..bake.execute import PLAIN_DTYPES
from ..devices import resolve_device
from ..errors import WeightsmithError
from ..estimate_work import bake_estimate
from ..paths import check_new_output
from ..progress import TerminalProgress

EPILOG = """\
LoRAs apply in the order given, as a chain of LoraLoaderModelOnly nodes would (this matters for DoRA).
Per-block strengths (--rule, repeatable, first match wins): PATTERN=FACTOR, PATTERN a regex searched in
key names without the checkpoint prefix or a group (@double @single @img @txt @in @mid @out @double.3 …,
see `weightsmith merge --list-groups`); FACTOR multiplies every LoRA's strength on the matching keys.

examples:
  weightsmith bake flux1-dev.safetensors style.safetensors:0.8 detail.safetensors:0.5 -o flux-baked.safetensors
  weightsmith bake sdxl.safetensors face.safetensors -o out.safetensors --dtype fp16 --rule '@out=0.5'
"""


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`style.safetensors:0.8` -> (path, 0.8); a path that itself exists wins over a `:` split."""
    if Path(text).exists() or ":" not in text:
        return Path(text), 1.0
    path, _, value = text.rpartition(":")
    try:
        return Path(path), float(value)
    except ValueError:
        raise WeightsmithError(f"{text!r}: give a LoRA as FILE or FILE:STRENGTH (e.g. style.safetensors:0.8)") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bake", help="bake LoRAs into a model file (streaming, exact, like a LoraLoaderModelOnly chain)",
                       description="Write MODEL with LoRAs applied, key by key: peak memory follows the largest "
                                   "tensor, not the model. fp32 math, one cast per key.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="the model (file, shard folder or index.json); a full checkpoint's text "
                                            "encoders get the LoRAs' text-encoder parts")
    p.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]", help="LoRA files in chain order, strength 1 "
                                                                       "unless given")
    p.add_argument("-o", "--output", type=Path, help="output .safetensors file")
    p.add_argument("--dtype", default="keep", choices=PLAIN_DTYPES,
                   help="output dtype of float tensors (default: keep the model's, per tensor)")
    p.add_argument("--rule", action="append", default=[], metavar="PATTERN=FACTOR",
                   help="per-block strength factor, e.g. '@single=0.5' (repeatable)")
    p.add_argument("--device", default="cpu", help="compute device: cpu or cuda (math is fp32 either way)")
    p.add_argument("--strict", action="store_true", help="refuse LoRAs with modules that match nothing in the model")
    p.add_argument("--report", type=Path, help="write the report as JSON here")
    p.add_argument("--dry-run", action="store_true", help="compute every patched key and report; write no model")
    p.add_argument("--plan-only", action="store_true",
                   help="print the estimate (output size, free disk, peak RAM, VRAM, time) and stop; headers only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.output is None and not (args.dry_run or args.plan_only):
        raise WeightsmithError("give an output file with -o OUT.safetensors (or use --dry-run)")
    if args.output is not None and args.output.suffix.lower() not in (".safetensors", ".sft"):
        raise WeightsmithError(f"output {args.output} must end in .safetensors")
    loras = [parse_lora_arg(x) for x in args.loras]
    for path, _ in loras:
        if not path.exists():
            raise WeightsmithError(f"{path}: no such LoRA file; check the path (strengths go after a colon: "
                                   f"{path.name}:0.8)")
    resolve_device(args.device)  # a missing GPU fails here, before any file is read
    inputs = [args.model, *(p for p, _ in loras)]
    if args.report:
        check_new_output(args.report, "report", protect=inputs, others=[args.output])
    plan = plan_bake(args.model, loras, args.rule, strict=args.strict)
    out = None if args.dry_run else args.output
    est = bake_estimate(plan, out, args.dtype, resolve_device(args.device))
    print(est.text())
    est.check_disk()  # before anything is read or written, --plan-only too
    if args.plan_only:
        return 0
    report = execute_bake(plan, out, args.dtype, args.device, TerminalProgress("bake"), overwrite=args.overwrite)
    print(report.table())
    if args.report:
        report.save_json(args.report)
    return 0
