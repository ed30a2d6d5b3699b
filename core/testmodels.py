"""Small models with the exact key names and layouts of the real architectures (no downloads possible).

Everything is deterministic from a seed. Widths are parameters: unit tests use hidden 64, the end-to-end
Flux file uses hidden 3072 (ComfyUI detects Flux only there: 24 heads x 128 are hard-coded), and
benchmarks use full-width layers. Layouts follow ComfyUI's `comfy/ldm/flux` and `comfy/ldm/chroma`
(the BFL names), and diffusers' `FluxTransformer2DModel` for the diffusers names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class FluxConfig:
    hidden: int = 64
    depth: int = 1  # double blocks
    depth_single: int = 1
    mlp_ratio: int = 4
    num_heads: int = 2
    in_channels: int = 64  # img_in input width (latent channels x patch 2x2)
    out_channels: int = 64  # final_layer.linear rows
    context_in: int = 32  # txt_in input width (4096 for T5-XXL)
    vec_in: int = 32  # vector_in input width (768 for CLIP-L pooled)
    # Chroma's distilled guidance approximator
    approx_in: int = 64
    approx_hidden: int = 32
    approx_layers: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def mlp(self) -> int:
        return self.hidden * self.mlp_ratio


# The real sizes, for end-to-end files and benchmarks.
FLUX_FULL = FluxConfig(hidden=3072, depth=19, depth_single=38, num_heads=24, context_in=4096, vec_in=768,
                       approx_hidden=5120, approx_layers=5)


def _linear(shapes: Shapes, name: str, out: int, inp: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (out, inp)
    if bias:
        shapes[f"{name}.bias"] = (out,)


def flux_shapes(cfg: FluxConfig = FluxConfig(), variant: str = "dev") -> Shapes:
    """BFL/ComfyUI key -> shape for variant 'dev' (guidance_in), 'schnell' (none) or 'chroma'."""
    if variant not in ("dev", "schnell", "chroma"):
        raise ValueError(f"unknown Flux variant {variant!r}")
    H, mlp, hd = cfg.hidden, cfg.mlp, cfg.head_dim
    chroma = variant == "chroma"
    s: Shapes = {}
    _linear(s, "img_in", H, cfg.in_channels)
    if not chroma:
        _linear(s, "time_in.in_layer", H, 256)
        _linear(s, "time_in.out_layer", H, H)
        _linear(s, "vector_in.in_layer", H, cfg.vec_in)
        _linear(s, "vector_in.out_layer", H, H)
        if variant == "dev":
            _linear(s, "guidance_in.in_layer", H, 256)
            _linear(s, "guidance_in.out_layer", H, H)
    else:
        A = cfg.approx_hidden
        _linear(s, "distilled_guidance_layer.in_proj", A, cfg.approx_in)
        for i in range(cfg.approx_layers):
            _linear(s, f"distilled_guidance_layer.layers.{i}.in_layer", A, A)
            _linear(s, f"distilled_guidance_layer.layers.{i}.out_layer", A, A)
            s[f"distilled_guidance_layer.norms.{i}.scale"] = (A,)
        _linear(s, "distilled_guidance_layer.out_proj", H, A)
    _linear(s, "txt_in", H, cfg.context_in)
    for n in range(cfg.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{n}.{stream}"
            if not chroma:
                _linear(s, f"{p}_mod.lin", 6 * H, H)
            _linear(s, f"{p}_attn.qkv", 3 * H, H)
            s[f"{p}_attn.norm.query_norm.scale"] = (hd,)
            s[f"{p}_attn.norm.key_norm.scale"] = (hd,)
            _linear(s, f"{p}_attn.proj", H, H)
            _linear(s, f"{p}_mlp.0", mlp, H)
            _linear(s, f"{p}_mlp.2", H, mlp)
    for n in range(cfg.depth_single):
        p = f"single_blocks.{n}"
        _linear(s, f"{p}.linear1", 3 * H + mlp, H)
        _linear(s, f"{p}.linear2", H, H + mlp)
        s[f"{p}.norm.query_norm.scale"] = (hd,)
        s[f"{p}.norm.key_norm.scale"] = (hd,)
        if not chroma:
            _linear(s, f"{p}.modulation.lin", 3 * H, H)
    _linear(s, "final_layer.linear", cfg.out_channels, H)
    if not chroma:
        _linear(s, "final_layer.adaLN_modulation.1", 2 * H, H)
    return s


def flux_diffusers_shapes(cfg: FluxConfig = FluxConfig(), guidance: bool = True) -> Shapes:
    """diffusers FluxTransformer2DModel key -> shape (the names ai-toolkit/PEFT LoRAs target)."""
    H, mlp, hd = cfg.hidden, cfg.mlp, cfg.head_dim
    s: Shapes = {}
    _linear(s, "x_embedder", H, cfg.in_channels)
    _linear(s, "context_embedder", H, cfg.context_in)
    _linear(s, "time_text_embed.timestep_embedder.linear_1", H, 256)
    _linear(s, "time_text_embed.timestep_embedder.linear_2", H, H)
    if guidance:
        _linear(s, "time_text_embed.guidance_embedder.linear_1", H, 256)
        _linear(s, "time_text_embed.guidance_embedder.linear_2", H, H)
    _linear(s, "time_text_embed.text_embedder.linear_1", H, cfg.vec_in)
    _linear(s, "time_text_embed.text_embedder.linear_2", H, H)
    for n in range(cfg.depth):
        p = f"transformer_blocks.{n}"
        _linear(s, f"{p}.norm1.linear", 6 * H, H)
        _linear(s, f"{p}.norm1_context.linear", 6 * H, H)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            _linear(s, f"{p}.attn.{proj}", H, H)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            s[f"{p}.attn.{norm}.weight"] = (hd,)
        _linear(s, f"{p}.attn.to_out.0", H, H)
        _linear(s, f"{p}.attn.to_add_out", H, H)
        _linear(s, f"{p}.ff.net.0.proj", mlp, H)
        _linear(s, f"{p}.ff.net.2", H, mlp)
        _linear(s, f"{p}.ff_context.net.0.proj", mlp, H)
        _linear(s, f"{p}.ff_context.net.2", H, mlp)
    for n in range(cfg.depth_single):
        p = f"single_transformer_blocks.{n}"
        _linear(s, f"{p}.norm.linear", 3 * H, H)
        for proj in ("to_q", "to_k", "to_v"):
            _linear(s, f"{p}.attn.{proj}", H, H)
        s[f"{p}.attn.norm_q.weight"] = (hd,)
        s[f"{p}.attn.norm_k.weight"] = (hd,)
        _linear(s, f"{p}.proj_mlp", mlp, H)
        _linear(s, f"{p}.proj_out", H, H + mlp)
    _linear(s, "norm_out.linear", 2 * H, H)
    _linear(s, "proj_out", cfg.out_channels, H)
    return s


# Norm gains: Flux/Chroma `.scale`, diffusers `norm_q.weight`, SD UNet GroupNorms (`in_layers.0`,
# `out_layers.0`, `out.0`, `norm`, `norm1..3`) and CLIP LayerNorms.
_NORM_GAIN = re.compile(
    r"(\.scale$)|((^|\.)(in_layers\.0|out_layers\.0|out\.0|norm\w*|layer_norm\d|final_layer_norm)\.weight$)"
)


def is_norm_gain(key: str) -> bool:
    """A normalisation gain: trained values sit around 1, not around 0."""
    return bool(_NORM_GAIN.search(key))


def _init_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Generated directly in a 16-bit dtype when asked, so writing a multi-GB model streams with no fp32 copy.
    dt = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32
    if len(shape) == 1 and is_norm_gain(key):
        return (torch.randn(shape, generator=gen, dtype=dt).mul_(0.05).add_(1.0)).to(dtype)  # norm gains sit near 1
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    std = 1.0 / max(fan_in, 1) ** 0.5 if len(shape) > 1 else 0.02
    return torch.randn(shape, generator=gen, dtype=dt).mul_(std).to(dtype)


def iter_random_tensors(shapes: Shapes, seed: int = 0, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random weights, one tensor at a time (each key seeded on its own, so a model can be
    generated streaming, and two models with shared keys and the same seed agree on them)."""
    for key, shape in shapes.items():
        gen = torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(key)) % (2**63))
        yield key, _init_tensor(key, shape, gen, dtype)


def _stable_hash(s: str) -> int:
    h = 1469598103934665603
    for b in s.encode():
        h = ((h ^ b) * 1099511628211) % (2**64)
    return h


def random_state_dict(shapes: Shapes, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return dict(iter_random_tensors(shapes, seed, dtype))


def flux_state_dict(cfg: FluxConfig = FluxConfig(), variant: str = "dev", seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return random_state_dict(flux_shapes(cfg, variant), seed, dtype)


def finetune(sd: dict[str, torch.Tensor], seed: int = 1, rank: int = 4, scale: float = 0.05,
             noise: float = 0.0, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A 'fine-tune' of `sd`: a random rank-`rank` change on every 2-D+ weight (times `scale` of the
    weight's own norm), plus optional full-rank noise; 1-D tensors get a small shift. Returns a new dict."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in sd.items():
        if keys is not None and k not in keys:
            out[k] = w.clone()
            continue
        wf = w.float()
        if wf.ndim >= 2:
            o = wf.shape[0]
            i = wf[0].numel()
            r = min(rank, o, i)
            d = torch.randn(o, r, generator=gen) @ torch.randn(r, i, generator=gen)
            d = d * (scale * wf.norm() / d.norm().clamp_min(1e-12))
            if noise:
                d = d + noise * wf.std() * torch.randn(o, i, generator=gen)
            out[k] = (wf + d.reshape(wf.shape)).to(w.dtype)
        elif wf.is_floating_point():
            out[k] = (wf + scale * 0.1 * torch.randn(wf.shape, generator=gen)).to(w.dtype)
        else:
            out[k] = w.clone()
    return out


def write_model(path, shapes: Shapes, seed: int = 0, dtype: torch.dtype = torch.bfloat16, prefix: str = "",
                metadata: dict[str, str] | None = None, transform=None) -> None:
    """Generate and write a model streaming (one tensor in memory at a time). `transform(key, t)` may
    alter each tensor (e.g. to make a 'fine-tune' of the same seed)."""
    from .safetensors_io import StreamingWriter

    plan = {prefix + k: (s, dtype) for k, s in shapes.items()}
    with StreamingWriter(path, plan, metadata or {}) as w:
        for k, t in iter_random_tensors(shapes, seed, torch.float32 if transform is not None else dtype):
            if transform is not None:
                t = transform(k, t)
            w.write(prefix + k, t.to(dtype))


FLUX_E2E = FluxConfig(hidden=3072, depth=1, depth_single=1, num_heads=24, context_in=4096, vec_in=768)
