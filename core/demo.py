"""The demo models the shipped workflows refer to, generated into ComfyUI's model folders.

Names are fixed (workflows reference them). Small models are hidden-64 Flux/Chroma files with the exact
BFL key layout; the 3072-wide Flux pair is the smallest Flux ComfyUI's UNETLoader detects; the tiny
SD1.5 UNets are the cheapest models the whole ComfyUI graph can load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .sdunet import write_sd15_tiny
from .testmodels import FLUX_E2E, FluxConfig, finetune, flux_shapes, iter_random_tensors, write_model

DEMO_DIR = "weightsmith_demo"


def _tuned_transform(seed: int):
    """Per-tensor 'fine-tune': a rank-8 change on 2-D weights, a small shift on 1-D ones."""

    def transform(key: str, t: torch.Tensor) -> torch.Tensor:
        return finetune({key: t}, seed=seed + hash_key(key), rank=8, scale=0.05)[key]

    return transform


def hash_key(key: str) -> int:
    return sum((i + 1) * b for i, b in enumerate(key.encode())) % 100_000


def make_demo_models(models_root: str | Path, full: bool = True, overwrite: bool = False) -> dict[str, Path]:
    """Write every demo model under `models_root/{diffusion_models,loras}/weightsmith_demo/`.
    Existing files are kept (generation is deterministic). `full` adds the 3072-wide Flux pair (~1 GB each)."""
    root = Path(models_root)
    dm = root / "diffusion_models" / DEMO_DIR
    lo = root / "loras" / DEMO_DIR
    dm.mkdir(parents=True, exist_ok=True)
    lo.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def model(name: str, shapes, seed: int, dtype=torch.bfloat16, transform=None) -> None:
        path = dm / name
        out[name] = path
        if path.exists() and not overwrite:
            return
        if path.exists():
            path.unlink()
        write_model(path, shapes, seed=seed, dtype=dtype, transform=transform,
                    metadata={"weightsmith.demo": "synthetic weights with a real key layout"})

    small = FluxConfig()
    model("flux1-dev-tiny.safetensors", flux_shapes(small, "dev"), seed=1)
    model("flux1-schnell-tiny.safetensors", flux_shapes(small, "schnell"), seed=2)
    model("flux1-dev-tiny-tuned.safetensors", flux_shapes(small, "dev"), seed=1, transform=_tuned_transform(7))
    model("chroma-tiny.safetensors", flux_shapes(small, "chroma"), seed=3)
    for i, tag in enumerate("abc"):
        name = f"sd15-tiny-{tag}.safetensors"
        out[name] = dm / name
        if not out[name].exists():
            write_sd15_tiny(out[name], seed=10 + i, metadata={"weightsmith.demo": "synthetic weights with a real key layout"})
    if full:
        model("flux1-dev-3072.safetensors", flux_shapes(FLUX_E2E, "dev"), seed=21)
        model("flux1-schnell-3072.safetensors", flux_shapes(FLUX_E2E, "schnell"), seed=22)
    try:
        from .lora.testloras import make_demo_loras
    except ImportError:
        make_demo_loras = None
    if make_demo_loras is not None:
        for p in make_demo_loras(lo) or []:
            out[Path(p).name] = Path(p)
    return out


__all__ = ["DEMO_DIR", "make_demo_models", "iter_random_tensors"]
