"""Deterministic random LoRAs for tests, benchmarks and the demo files the shipped workflows use."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..testmodels import FluxConfig, Shapes, _stable_hash, flux_shapes
from . import keymaps as km
from .model import LoRA, LoraTerm, ModuleDelta

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

Targets = Iterable[str] | Callable[[str], bool] | None


def _wanted(targets: Targets) -> Callable[[str], bool]:
    if targets is None:
        return lambda key: True
    if callable(targets):
        return targets
    names = set(targets)
    return lambda key: key in names or key.rsplit(".", 1)[0] in names


def _sd_layout(shapes: Shapes, arch: str) -> str | None:
    """'<arch>/<size>' when the shapes are exactly one of the sdunet test layouts."""
    try:
        from ..sdunet import SD_UNET_CONFIGS, unet_shapes
    except ImportError:
        return None
    keys = set(shapes)
    for (kind, size), cfg in SD_UNET_CONFIGS.items():
        if kind == arch and size != "full" and set(unet_shapes(cfg)) == keys:
            return f"{kind}/{size}"
    return None


def random_lora(
    shapes: dict[str, tuple[int, ...]],
    arch: str,
    rank: int = 4,
    seed: int = 0,
    targets: Targets = None,
    with_bias: bool = False,
    alpha: float | None = None,
    scale: float = 0.02,
) -> LoRA:
    """A canonical LoRA on every 2-D+ weight of a model described by `shapes` (model key -> shape, prefix
    optional), or only on `targets` (keys, module names, or a predicate on the key). Conv weights get
    kohya-style factors (down [r, in, kh, kw], up [out, r, 1, 1]). `alpha` defaults to rank / 2 so that
    alpha handling is exercised. `with_bias` adds a bias change where the model has a bias."""
    wanted = _wanted(targets)
    lora = LoRA(arch=arch, source_format="random", metadata={"weightsmith.arch": arch})
    stripped = {}
    for key, shape in shapes.items():
        for p in _PREFIXES:
            if key.startswith(p):
                key = key[len(p):]
                break
        stripped[key] = tuple(shape)
    if arch in ("sd15", "sdxl") and (layout := _sd_layout(stripped, arch)):
        lora.metadata[km.SD_LAYOUT_META] = layout
    a = rank / 2 if alpha is None else alpha
    for key, shape in stripped.items():
        if not key.endswith(".weight") or len(shape) < 2 or not wanted(key):
            continue
        gen = torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(key)) % (2**63))
        r = min(rank, shape[0], shape[1])
        down = torch.randn((r, *shape[1:]), generator=gen) * scale
        up = torch.randn((shape[0], r, *([1] * (len(shape) - 2))), generator=gen) * scale
        mod = ModuleDelta(terms=[LoraTerm(up=up, down=down, alpha=a)])
        bias = key[: -len(".weight")] + ".bias"
        if with_bias and bias in stripped:
            mod.diff_b = torch.randn(stripped[bias], generator=gen) * scale
        lora.modules[km.DIFFUSION + key[: -len(".weight")]] = mod
    return lora


def flux_block_linears(key: str) -> bool:
    """Every linear of the Flux blocks and heads (incl. modulations and embedders): not the norm gains."""
    return key.endswith(".weight")


def flux_attn_mlp(key: str) -> bool:
    """The layers ai-toolkit/diffusers LoRAs usually train: attention and MLP linears of every block."""
    return key.startswith(("double_blocks.", "single_blocks.")) and not any(
        s in key for s in ("_mod.", "modulation.", "norm.")
    )


DEMO_LORAS = ("flux-kohya-r8.safetensors", "flux-diffusers-r4.safetensors", "sd15-kohya-r4.safetensors")


def make_demo_loras(loras_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write the demo LoRAs the shipped workflows load (for flux1-dev-tiny and sd15-tiny-*).
    Existing files are kept unless `overwrite` (generation is deterministic)."""
    from .formats import save_lora

    root = Path(loras_dir)
    root.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []

    def save(name: str, make: Callable[[], LoRA], fmt: str) -> None:
        path = root / name
        out.append(path)
        if path.exists() and not overwrite:
            return
        if path.exists():
            path.unlink()
        save_lora(make(), path, fmt=fmt, dtype=torch.bfloat16 if name.startswith("flux") else torch.float16,
                  metadata={"weightsmith.demo": "synthetic LoRA with a real key layout"})

    shapes = flux_shapes(FluxConfig(), "dev")
    save(DEMO_LORAS[0], lambda: random_lora(shapes, "flux", rank=8, seed=101, targets=flux_block_linears), "kohya")
    save(DEMO_LORAS[1], lambda: random_lora(shapes, "flux", rank=4, seed=102, targets=flux_attn_mlp, alpha=4.0),
         "diffusers")
    try:
        from ..sdunet import sd_unet_shapes
    except ImportError:  # SD layouts not available: the Flux demo LoRAs still work
        return out
    sd_shapes = sd_unet_shapes("sd15", "tiny")
    save(DEMO_LORAS[2], lambda: random_lora(sd_shapes, "sd15", rank=4, seed=103), "kohya")
    return out
