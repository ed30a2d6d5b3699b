"""The demo models the shipped workflows refer to, generated into ComfyUI's model folders.

Names are fixed (workflows reference them). Which demo models ComfyUI itself can load as a MODEL (Load
Diffusion Model), for the in-graph nodes (Merge Models, Lossless Mix, Extract LoRA, Apply LoRA):
- sd15-tiny-{a,b,c}: tiny SD1.5 UNets, the cheapest models the whole ComfyUI graph can load;
- wan2.2-t2v-{high,low}-noise-tiny(-tuned): a Wan 2.2 T2V expert pair (dim 128, 2 blocks, ~2 MB each) and a
  fine-tune of each expert, in ComfyUI's native Wan names;
- flux1-{dev,schnell}-3072: ComfyUI's Flux needs hidden size 3072 (24 heads of 128), so this pair (one block
  of each kind, ~1 GB each) is the smallest Flux it loads; `make demo --small` skips it.
The hidden-64 Flux/Chroma files (`*-tiny`) have the exact BFL key layout for the file nodes (Merge Model
Files, Extract LoRA from Files, …) but are NOT loadable as a MODEL ("Hidden size 64 must be divisible by
num_heads 24"); the templates that use them say so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .sdunet import write_sd15_tiny
from .testmodels import FLUX_E2E, FluxConfig, finetune, flux_shapes, iter_random_tensors, write_model

DEMO_DIR = "weightsmith_demo"
# The demo models ComfyUI's Load Diffusion Model loads (the rest are for the file nodes only).
LOADABLE_AS_MODEL = ("sd15-tiny-", "wan2.2-", "flux1-dev-3072", "flux1-schnell-3072")
WAN_EXPERTS = ("high", "low")  # Wan 2.2 A14B: a high-noise expert for the first steps, a low-noise one after


def wan_shapes(dim: int = 128, ffn: int = 256, layers: int = 2, text_dim: int = 4096, freq_dim: int = 256,
               in_dim: int = 16, out_dim: int = 16) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Wan 2.1/2.2 T2V diffusion model in ComfyUI's native names (comfy/ldm/wan/model.py).
    ComfyUI's detection fixes heads = dim // 128, freq_dim 256 and (from its UMT5 encoder) text_dim 4096, so
    dim 128 is the smallest Wan it loads; the key set equals ComfyUI's state dict (tests/test_demo_models.py)."""
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
    }
    for i in range(layers):
        b = f"blocks.{i}."
        shapes[b + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{b}{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"{b}{attn}.{proj}.bias"] = (dim,)
            shapes[f"{b}{attn}.norm_q.weight"] = (dim,)
            shapes[f"{b}{attn}.norm_k.weight"] = (dim,)
        shapes[b + "norm3.weight"] = (dim,)
        shapes[b + "norm3.bias"] = (dim,)
        shapes[b + "ffn.0.weight"], shapes[b + "ffn.0.bias"] = (ffn, dim), (ffn,)
        shapes[b + "ffn.2.weight"], shapes[b + "ffn.2.bias"] = (dim, ffn), (dim,)
    shapes["head.modulation"] = (1, 2, dim)
    shapes["head.head.weight"] = (out_dim * 4, dim)
    shapes["head.head.bias"] = (out_dim * 4,)
    return shapes


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
    for i, expert in enumerate(WAN_EXPERTS):  # the expert pair and a fine-tune of each (e.g. one style, both)
        model(f"wan2.2-t2v-{expert}-noise-tiny.safetensors", wan_shapes(), seed=31 + i)
        model(f"wan2.2-t2v-{expert}-noise-tiny-tuned.safetensors", wan_shapes(), seed=31 + i,
              transform=_tuned_transform(41 + i))
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


__all__ = ["DEMO_DIR", "LOADABLE_AS_MODEL", "WAN_EXPERTS", "iter_random_tensors", "make_demo_models", "wan_shapes"]
