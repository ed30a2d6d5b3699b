"""`weightsmith mix A B C [D …] -o OUT`: lossless mix — per element, the candidate nearest to (or with
--maxdiff farthest from) the reference A, streaming; --dry-run only reports."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..dtypes import MODEL_OUTPUT_CHOICES
from ..encodings.encode import parse_output
from ..errors import WeightsmithError
from ..estimate_work import mix_estimate
from ..mix import GROUPS, lossless_mix, plan_mix, resolve_device
from ..mix_report import sampled_tie_warning
from ..paths import check_new_output, check_output_suffix
from ..progress import TerminalProgress
from ..report import save_png, write_json
from ..sources import as_source


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mix",
        help="lossless mix: per element, keep the candidate nearest to (or farthest from) a reference model",
        description="Per element of every mixed tensor, write the element of B or C (or further candidates) "
                    "whose value is nearest to the reference A, comparing |A - alpha*B| with |A - beta*C| (ties "
                    "take B); --maxdiff takes the farther one (ties take C). alpha/beta only bias the "
                    "comparison, the written value is unscaled. Recipe, each element from A or B: merge A and B "
                    "with a weighted sum into AB, then `weightsmith mix AB A B --alpha 1 --beta 0.9 -o "
                    "out.safetensors`. Compared unscaled, a 50/50 AB is equally far from A and B in every element: "
                    "every element ties and the mix is just A (the first candidate; a 60/40 AB is nearer A "
                    "everywhere: A again); alpha ≠ beta makes the values decide, and the report shows the split. "
                    "A reference that is not a blend of the candidates (a third model) needs no bias.",
    )
    p.add_argument("reference", type=Path, help="model A, the reference (its keys and layout make the output)")
    p.add_argument("candidates", type=Path, nargs="+", help="models B, C (and more): where the elements come from")
    p.add_argument("-o", "--output", type=Path, help="output .safetensors (required unless --dry-run)")
    p.add_argument("--alpha", type=float, default=1.0, help="scale of B in the comparison (default 1)")
    p.add_argument("--beta", type=float, default=1.0, help="scale of C in the comparison (default 1)")
    p.add_argument("--scales", help="comma-separated comparison scales, one per candidate (overrides alpha/beta)")
    p.add_argument("--maxdiff", action="store_true", help="take the candidate farthest from A instead of nearest")
    p.add_argument("--include", default="unet",
                   help="key groups to mix, comma-separated from unet,te,vae (default unet: the diffusion model; "
                        "text encoders and VAE are copied from A unless named)")
    p.add_argument("--on-mismatch", choices=["keep_a", "error"], default="keep_a",
                   help="a tensor whose shape or kind differs between the models: keep A's and report (default), "
                        "or stop with an error")
    p.add_argument("--dtype", default="keep",
                   help=f"output dtype ({', '.join(MODEL_OUTPUT_CHOICES)}): keep (default; each mixed tensor in the dtype holding all candidates "
                        "exactly, and tensors A stores scaled-fp8 / mixed precision in that encoding again, with "
                        "fresh scales), fp32/fp16/bf16/fp8 for every float tensor, or fp8_scaled[_e5m2] "
                        "(ComfyUI scaled fp8 for the diffusion model's Linear weights)")
    p.add_argument("--device", default="cpu", help="compute device (cpu, cuda, cuda:1 …)")
    p.add_argument("--dry-run", action="store_true", help="write nothing; report similarity and shares per block")
    p.add_argument("--plan-only", action="store_true",
                   help="print the estimate (output size, free disk, peak RAM, VRAM, time) and stop; headers only")
    p.add_argument("--stats", action="store_true",
                   help="on a real run, also compute cosine similarities, ties and mean |change| (a dry run "
                        "always does; the shares taken from each model are always reported)")
    p.add_argument("--report", type=Path, help="also write the report as JSON here")
    p.add_argument("--chart", type=Path, help="also write the report chart as PNG here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def _estimate(args: argparse.Namespace, include: list[str], output):
    sources = [as_source(p) for p in (args.reference, *args.candidates)]
    plan = plan_mix(sources[0], sources[1:], include, args.on_mismatch)
    return mix_estimate(plan, sources, output, resolve_device(args.device), args.dtype)


def run(args: argparse.Namespace) -> int:
    include = [g.strip() for g in args.include.split(",") if g.strip()]
    bad = [g for g in include if g not in GROUPS]
    if bad or not include:
        raise WeightsmithError(f"--include takes a comma-separated list of {', '.join(GROUPS)}, not {args.include!r}")
    if len(args.candidates) < 2:
        raise WeightsmithError("give a reference and at least two candidates: weightsmith mix A B C -o OUT")
    if not (args.dry_run or args.plan_only) and args.output is None:
        raise WeightsmithError("name the output with -o OUT.safetensors, or ask for --dry-run")
    if args.output is not None:
        check_output_suffix(args.output)
    resolve_device(args.device)  # a missing GPU fails here, before any file is opened
    parse_output(args.dtype)  # so does an unknown output dtype
    inputs = [args.reference, *args.candidates]
    output = None if args.dry_run else args.output
    # The report and chart are written after the mix: check their paths now, so a bad one costs nothing.
    for what, path, other in (("report", args.report, args.chart), ("chart", args.chart, args.report)):
        if path is not None:
            check_new_output(path, what, protect=inputs, others=[output, other])
    scales = None
    if args.scales:
        try:
            scales = [float(s) for s in args.scales.split(",")]
        except ValueError:
            raise WeightsmithError(f"--scales must be numbers separated by commas, not {args.scales!r}") from None
    est = _estimate(args, include, output)
    print(est.text())
    est.check_disk()  # before anything is read or written, --plan-only too
    if args.plan_only:
        return 0
    comparison = scales or [args.alpha, args.beta] + [1.0] * (len(args.candidates) - 2)
    mode = "max" if args.maxdiff else "min"
    # a run without statistics cannot see ties: a sample is checked, so the report names a tie-decided mix
    sampled = "" if args.dry_run or args.stats else sampled_tie_warning(
        args.reference, args.candidates, comparison, mode, include, args.device)
    report = lossless_mix(
        args.reference, candidates=args.candidates, alpha=args.alpha, beta=args.beta, scales=scales,
        mode="max" if args.maxdiff else "min", out=output, include=include,
        on_mismatch=args.on_mismatch, dry_run=args.dry_run, device=args.device, out_dtype=args.dtype,
        overwrite=args.overwrite, progress=TerminalProgress("mix"), stats=True if args.stats else None,
    )
    report.tie_warning = report.tie_warning or sampled
    print(report.text())
    if args.report:
        write_json(args.report, report.to_json())
    if args.chart:
        save_png(report.chart(), args.chart)
    return 0
