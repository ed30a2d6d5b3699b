"""`weightsmith testmodels`: write small models with the real architectures' key names (for demos/tests)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..dtypes import parse_dtype
from ..paths import check_output_suffix
from ..testmodels import FLUX_E2E, FluxConfig, flux_diffusers_shapes, flux_shapes, write_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("testmodels", help="write a synthetic model with a real architecture's key layout")
    p.add_argument("arch", choices=["flux-dev", "flux-schnell", "chroma", "flux-diffusers"])
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--hidden", type=int, default=64, help="hidden size (3072 = loadable by ComfyUI's UNETLoader)")
    p.add_argument("--double", type=int, default=1, help="number of double blocks")
    p.add_argument("--single", type=int, default=1, help="number of single blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_suffix(args.output)
    if args.hidden == 3072:
        cfg = FluxConfig(**{**FLUX_E2E.__dict__, "depth": args.double, "depth_single": args.single})
    else:
        cfg = FluxConfig(hidden=args.hidden, depth=args.double, depth_single=args.single)
    if args.arch == "flux-diffusers":
        shapes = flux_diffusers_shapes(cfg)
    else:
        shapes = flux_shapes(cfg, args.arch.replace("flux-", ""))
    write_model(args.output, shapes, seed=args.seed, dtype=parse_dtype(args.dtype))
    print(args.output)
    return 0
