"""`weightsmith merge`: merge 2..N models streaming, with a method, weights and per-key rules."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..devices import resolve_device
from ..dtypes import MODEL_OUTPUT_CHOICES
from ..encodings.gguf_write import GGUF_OUTPUT_TYPES
from ..errors import WeightsmithError
from ..estimate_work import merge_estimate
from ..merge.execute import execute_merge
from ..merge.methods import describe_methods
from ..merge.plan import MISSING_POLICIES, OTHERS_POLICIES, plan_merge
from ..merge.rules import PRESETS, group_aliases
from ..paths import check_new_output
from ..progress import TerminalProgress
from ..report import format_table, save_png

EPILOG = """\
rules (--rule, repeatable, first match wins): REGEX=ACTION, REGEX searched in key names without the
checkpoint prefix (or @group, see --list-groups); ACTION: a method name with optional parameters
('ties(density=0.3)'), take:A / take:2 / take:first, drop, or weight:0.7,0.3.

examples:
  weightsmith merge dev.safetensors schnell.safetensors -o devschnell.safetensors --preset flux-guidance-keep
  weightsmith merge a.safetensors b.safetensors -o ab.safetensors --weights 0.7,0.3 --rule '@single=weight:0.3,0.7'
  weightsmith merge base.safetensors ft1.safetensors ft2.safetensors -o t.safetensors --method ties --param density=0.3
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models key by key (streaming): weighted sum, TIES, DARE, SLERP, …",
                       description="Merge 2..N models streaming: peak memory follows the largest tensor, not the model.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", type=Path, help="input models A B [C …] (file, shard folder or index.json)")
    p.add_argument("-o", "--output", type=Path, help="output .safetensors file (.gguf with --dtype gguf-…)")
    p.add_argument("--method", default="weighted_sum", help="merge method (see --list-methods); default weighted_sum")
    p.add_argument("--weights", default=None, help="one weight per model, e.g. 0.7,0.3 (default: the method's)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter, e.g. density=0.3, seed=7, base=A (repeatable)")
    p.add_argument("--rule", action="append", default=[], metavar="REGEX=ACTION", help="per-key rule (repeatable)")
    p.add_argument("--preset", action="append", default=[], choices=sorted(PRESETS), help="named rule set (repeatable)")
    p.add_argument("--missing", default="take", choices=MISSING_POLICIES,
                   help="keys only some models have: take (from the first that has it), drop, or error")
    p.add_argument("--others", default="copy", choices=OTHERS_POLICIES,
                   help="keys outside the diffusion model (text encoders, VAE): copy from A, merge, or drop")
    p.add_argument("--dtype", default="keep", choices=MODEL_OUTPUT_CHOICES + list(GGUF_OUTPUT_TYPES),
                   help="output dtype (default keep: A's dtype per tensor, and A's ComfyUI scaled-fp8 / mixed-precision "
                        "encoding with scales recomputed from the merged weights); fp8_scaled[_e5m2]: ComfyUI scaled "
                        "fp8 for the diffusion model's Linear weights; gguf-… writes a ComfyUI-GGUF file of the "
                        "diffusion model")
    p.add_argument("--device", default="cpu", help="compute device: cpu or cuda (math is fp32 either way)")
    p.add_argument("--report", type=Path, help="write the merge report as JSON here")
    p.add_argument("--chart", type=Path, help="write the per-group chart as PNG here")
    p.add_argument("--dry-run", action="store_true", help="compute the merge and the report, write no model")
    p.add_argument("--plan-only", action="store_true",
                   help="print the plan and the estimate (output size, free disk, peak RAM, VRAM, time; headers only, "
                        "instant) and stop")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--list-methods", action="store_true", help="list merge methods and their parameters")
    p.add_argument("--list-presets", action="store_true", help="list presets")
    p.add_argument("--list-groups", action="store_true", help="list @group aliases usable in rules")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list_methods or args.list_presets or args.list_groups:
        if args.list_methods:
            print(format_table(describe_methods(), ["method", "inputs", "params", "description"]))
        if args.list_presets:
            print(format_table([{"preset": k, "rules": "; ".join(r), "meaning": d} for k, (d, r) in PRESETS.items()]))
        if args.list_groups:
            print(format_table(group_aliases(), ["alias", "meaning", "regex"]))
        return 0
    if len(args.models) < 2:
        raise WeightsmithError("give at least two models to merge")
    if args.output is None and not (args.dry_run or args.plan_only):
        raise WeightsmithError("give an output file with -o OUT.safetensors (or use --dry-run / --plan-only)")
    # keep with a .gguf output: model A's GGUF type (execute_merge checks that A is a GGUF file)
    gguf_out = args.dtype in GGUF_OUTPUT_TYPES or (args.dtype == "keep" and args.output is not None
                                                   and args.output.suffix.lower() == ".gguf"
                                                   and Path(args.models[0]).suffix.lower() == ".gguf")
    if args.output is not None and gguf_out and args.output.suffix.lower() != ".gguf":
        raise WeightsmithError(f"output {args.output} must end in .gguf with --dtype {args.dtype}")
    if args.output is not None and not gguf_out and args.output.suffix.lower() not in (".safetensors", ".sft"):
        hint = " (for a GGUF file give --dtype gguf-q8_0, gguf-q5_1, gguf-q4_1, gguf-f16 …, or keep with a .gguf model A)" \
            if args.output.suffix.lower() == ".gguf" else ""
        raise WeightsmithError(f"output {args.output} must end in .safetensors{hint}")
    # --report/--chart are outputs too: a bad path (an input, an existing file) fails now, not after the merge
    if args.report:
        check_new_output(args.report, "report", protect=args.models, others=[args.output, args.chart])
    if args.chart and not args.plan_only:
        check_new_output(args.chart, "chart", protect=args.models, others=[args.output])
    plan = plan_merge(args.models, args.method, args.weights, args.rule, args.missing, "\n".join(args.param),
                      args.preset, args.others)
    out = None if args.dry_run else args.output
    est = merge_estimate(plan, out, None if args.dtype == "keep" else args.dtype, resolve_device(args.device))
    if args.plan_only:
        print(plan.describe())
        print(est.text())
        est.check_disk()
        if args.report:
            from ..report import write_json

            write_json(args.report, {"plan": plan.summary(), "estimate": est.to_dict()})
        return 0
    print(est.text())
    est.check_disk()  # before anything is read or written
    report = execute_merge(plan, out, None if args.dtype == "keep" else args.dtype, args.device,
                           TerminalProgress("merge"), overwrite=args.overwrite)
    print(report.table())
    if args.report:
        report.save_json(args.report)
    if args.chart:
        save_png(report.chart(), args.chart)
    return 0
