"""Streaming write of a > 1 GB Flux-shaped model: peak anonymous memory (RssAnon; mmapped file pages don't
count) above the interpreter's baseline, vs `safetensors.torch.save_file` of the whole dict, same run.

    .venv/bin/python bench/bench_io.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import measure, table  # noqa: E402

from weightsmith.testmodels import FLUX_E2E, FluxConfig, flux_shapes, iter_random_tensors, write_model  # noqa: E402


def streaming_write(path: str, cfg: FluxConfig) -> None:
    write_model(path, flux_shapes(cfg, "dev"), seed=0, dtype=torch.bfloat16)


def whole_dict_save_file(path: str, cfg: FluxConfig) -> None:
    from safetensors.torch import save_file

    save_file(dict(iter_random_tensors(flux_shapes(cfg, "dev"), 0, torch.bfloat16)), path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a 0.3 GB model instead of 2.2 GB")
    args = ap.parse_args(argv)
    cfg = FluxConfig(**{**FLUX_E2E.__dict__, "depth": 0 if args.quick else 2, "depth_single": 1 if args.quick else 2})
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as tmp:
        rows = [
            measure("streaming write (StreamingWriter)", streaming_write, f"{tmp}/a.safetensors", cfg),
            measure("whole dict + save_file", whole_dict_save_file, f"{tmp}/b.safetensors", cfg),
        ]
        size = Path(f"{tmp}/a.safetensors").stat().st_size
    print(f"model: Flux-shaped, hidden 3072, {cfg.depth} double + {cfg.depth_single} single blocks, bf16, {size / 1e9:.2f} GB")
    print(table(rows, baseline="whole dict + save_file"))
    extra = rows[0].extra_anon / 2**20
    print(f"streaming write: peak RssAnon {extra:.0f} MB above the interpreter's baseline (target < 400 MB)")
    return 0 if extra < 400 else 1


if __name__ == "__main__":
    sys.exit(main())
