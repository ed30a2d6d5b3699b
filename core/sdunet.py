"""SD1.5 / SDXL UNet and CLIP text-encoder layouts for test models, and the LDM <-> diffusers UNet names.

Shapes follow ComfyUI's `comfy/ldm/modules/diffusionmodules/openaimodel.UNetModel` (the LDM names of
every SD checkpoint: `input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`, ...) and
`comfy/clip_model.CLIPTextModel` inside `comfy/sd1_clip.SDClipModel` (`clip_l.transformer.text_model.*`).
The diffusers names are those of `UNet2DConditionModel`, which kohya (`lora_unet_down_blocks_0_...`) and
diffusers/PEFT SD LoRAs use. The name map is derived from the keys alone, so it also works for a real
checkpoint whose config is unknown.

Sizes: 'tiny' SD1.5 is the smallest UNet ComfyUI's UNETLoader still detects as SD15 (its detection needs
model_channels 320 and context 768); 'tiny'/'small' SDXL are SDXL-shaped (linear projections, context 2048,
adm 2816) but not file-detectable (ComfyUI's SDXL match needs the full transformer depths), so tests build
them with `comfy.supported_models.SDXL(cfg)`; 'full' are the real configs (shapes only).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from .errors import MismatchError
from .testmodels import Shapes, is_norm_gain, iter_random_tensors, write_model  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class SDUNetConfig:
    """The knobs of an LDM UNet that decide its keys and shapes (ComfyUI's `unet_config` per level)."""

    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level; the up path mirrors it
    transformer_depth_middle: int = 1  # -1: middle resblock only, -2: no middle block at all
    context_dim: int = 768
    num_heads: int = 8  # used when num_head_channels == -1 (SD1.5); SDXL fixes 64 channels per head
    num_head_channels: int = -1
    use_linear_in_transformer: bool = False  # SD1.5: 1x1 conv proj_in/proj_out; SDXL: linear
    adm_in_channels: int | None = None  # SDXL: 2816 (pooled CLIP-G 1280 + 6 size/crop embeddings x 256)
    in_channels: int = 4
    out_channels: int = 4

    def __post_init__(self) -> None:
        n = len(self.channel_mult)
        if len(self.num_res_blocks) != n or len(self.transformer_depth) != n:
            raise ValueError("channel_mult, num_res_blocks and transformer_depth need one entry per level")
        for level, mult in enumerate(self.channel_mult):
            ch = mult * self.model_channels
            if ch % 32:
                raise ValueError(f"level {level}: {ch} channels is not a multiple of 32 (GroupNorm(32))")
            if self.transformer_depth[level] or (level == n - 1 and self.transformer_depth_middle >= 0):
                self.heads(ch)

    def heads(self, ch: int) -> tuple[int, int]:
        """(heads, head_dim) of an attention block at `ch` channels, as UNetModel picks them."""
        if self.num_head_channels == -1:
            heads, dim = self.num_heads, ch // self.num_heads
        else:
            heads, dim = ch // self.num_head_channels, self.num_head_channels
        if heads * dim != ch:
            # UNetModel would build inner_dim != channels; no SD model does, so neither do we
            raise ValueError(f"{ch} channels do not split into {heads} heads exactly")
        return heads, dim

    def comfy_unet_config(self) -> dict:
        """What `comfy.model_detection.detect_unet_config` returns for a state dict of this layout."""
        td_in: list[int] = []
        td_out: list[int] = []
        for level, depth in enumerate(self.transformer_depth):
            td_in += [depth] * self.num_res_blocks[level]
            td_out += [depth] * (self.num_res_blocks[level] + 1)
        has_attention = any(self.transformer_depth) or self.transformer_depth_middle >= 0
        cfg: dict = {
            "use_checkpoint": False,
            "image_size": 32,
            "use_spatial_transformer": True,
            "legacy": False,
            "adm_in_channels": self.adm_in_channels,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "model_channels": self.model_channels,
            "num_res_blocks": list(self.num_res_blocks),
            "transformer_depth": td_in,
            "transformer_depth_output": td_out,
            "channel_mult": list(self.channel_mult),
            "transformer_depth_middle": self.transformer_depth_middle,
            "use_linear_in_transformer": self.use_linear_in_transformer if has_attention else False,
            "context_dim": self.context_dim if has_attention else None,
            "use_temporal_resblock": False,
            "use_temporal_attention": False,
        }
        if self.adm_in_channels is not None:
            cfg["num_classes"] = "sequential"
        return cfg

    def unet_model_kwargs(self) -> dict:
        """Keyword arguments for ComfyUI's `UNetModel(**kwargs, operations=...)` (heads included)."""
        return {**self.comfy_unet_config(), "num_heads": self.num_heads, "num_head_channels": self.num_head_channels}


SD15_HEADS = {"num_heads": 8, "num_head_channels": -1}
SDXL_HEADS = {"num_heads": -1, "num_head_channels": 64}

SD_UNET_CONFIGS: dict[tuple[str, str], SDUNetConfig] = {
    # detected as SD15 by UNETLoader: one level, one resblock + one transformer block, no middle block
    ("sd15", "tiny"): SDUNetConfig(model_channels=320, channel_mult=(1,), num_res_blocks=(1,), transformer_depth=(1,),
                                   transformer_depth_middle=-2, context_dim=768, **SD15_HEADS),
    # the SD1.5 structure (attention-free last level, middle attention, skip convs) at width 64
    ("sd15", "small"): SDUNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
                                    transformer_depth=(1, 1, 0), transformer_depth_middle=1, context_dim=768, **SD15_HEADS),
    ("sd15", "full"): SDUNetConfig(**SD15_HEADS),
    ("sdxl", "tiny"): SDUNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(0, 2),
                                   transformer_depth_middle=1, context_dim=2048, use_linear_in_transformer=True,
                                   adm_in_channels=2816, **SDXL_HEADS),
    # the SDXL structure (attention-free first level, 2 resblocks per level, deep middle) at width 64
    ("sdxl", "small"): SDUNetConfig(model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
                                    transformer_depth=(0, 1, 2), transformer_depth_middle=2, context_dim=2048,
                                    use_linear_in_transformer=True, adm_in_channels=2816, **SDXL_HEADS),
    ("sdxl", "full"): SDUNetConfig(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
                                   transformer_depth=(0, 2, 10), transformer_depth_middle=10, context_dim=2048,
                                   use_linear_in_transformer=True, adm_in_channels=2816, **SDXL_HEADS),
}


def sd_unet_config(kind: str, size: str = "tiny") -> SDUNetConfig:
    """The config of `kind` 'sd15' | 'sdxl' at `size` 'tiny' | 'small' | 'full'."""
    try:
        return SD_UNET_CONFIGS[(kind, size)]
    except KeyError:
        raise ValueError(f"unknown SD UNet {kind!r}/{size!r}; kinds: sd15, sdxl; sizes: tiny, small, full") from None


# --- shapes -------------------------------------------------------------------------------------------

def _linear(s: Shapes, name: str, out: int, inp: int, bias: bool = True) -> None:
    s[f"{name}.weight"] = (out, inp)
    if bias:
        s[f"{name}.bias"] = (out,)


def _conv(s: Shapes, name: str, out: int, inp: int, k: int) -> None:
    s[f"{name}.weight"] = (out, inp, k, k)
    s[f"{name}.bias"] = (out,)


def _norm(s: Shapes, name: str, ch: int) -> None:
    s[f"{name}.weight"] = (ch,)
    s[f"{name}.bias"] = (ch,)


def _resblock(s: Shapes, p: str, ch_in: int, ch_out: int, emb: int) -> None:
    _norm(s, f"{p}.in_layers.0", ch_in)
    _conv(s, f"{p}.in_layers.2", ch_out, ch_in, 3)
    _linear(s, f"{p}.emb_layers.1", ch_out, emb)
    _norm(s, f"{p}.out_layers.0", ch_out)
    _conv(s, f"{p}.out_layers.3", ch_out, ch_out, 3)
    if ch_in != ch_out:
        _conv(s, f"{p}.skip_connection", ch_out, ch_in, 1)


def _spatial_transformer(s: Shapes, p: str, ch: int, depth: int, cfg: SDUNetConfig) -> None:
    cfg.heads(ch)  # inner_dim == ch, checked
    _norm(s, f"{p}.norm", ch)
    proj = _linear if cfg.use_linear_in_transformer else (lambda s_, n, o, i: _conv(s_, n, o, i, 1))
    proj(s, f"{p}.proj_in", ch, ch)
    for t in range(depth):
        b = f"{p}.transformer_blocks.{t}"
        for x in ("to_q", "to_k", "to_v"):
            _linear(s, f"{b}.attn1.{x}", ch, ch, bias=False)
        _linear(s, f"{b}.attn1.to_out.0", ch, ch)
        _linear(s, f"{b}.ff.net.0.proj", ch * 8, ch)  # GEGLU: value and gate halves of the 4x inner width
        _linear(s, f"{b}.ff.net.2", ch, ch * 4)
        _linear(s, f"{b}.attn2.to_q", ch, ch, bias=False)
        _linear(s, f"{b}.attn2.to_k", ch, cfg.context_dim, bias=False)
        _linear(s, f"{b}.attn2.to_v", ch, cfg.context_dim, bias=False)
        _linear(s, f"{b}.attn2.to_out.0", ch, ch)
        for n in ("norm2", "norm1", "norm3"):  # BasicTransformerBlock's registration order
            _norm(s, f"{b}.{n}", ch)
    proj(s, f"{p}.proj_out", ch, ch)


def unet_shapes(cfg: SDUNetConfig) -> Shapes:
    """LDM key -> shape of ComfyUI's UNetModel for `cfg`, in the model's own state_dict order."""
    mc = cfg.model_channels
    emb = mc * 4
    s: Shapes = {}
    _linear(s, "time_embed.0", emb, mc)
    _linear(s, "time_embed.2", emb, emb)
    if cfg.adm_in_channels is not None:
        _linear(s, "label_emb.0.0", emb, cfg.adm_in_channels)
        _linear(s, "label_emb.0.2", emb, emb)
    _conv(s, "input_blocks.0.0", mc, cfg.in_channels, 3)
    skip_chans = [mc]
    ch = mc
    block = 1
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks[level]):
            _resblock(s, f"input_blocks.{block}.0", ch, mult * mc, emb)
            ch = mult * mc
            if cfg.transformer_depth[level]:
                _spatial_transformer(s, f"input_blocks.{block}.1", ch, cfg.transformer_depth[level], cfg)
            skip_chans.append(ch)
            block += 1
        if level != last:
            _conv(s, f"input_blocks.{block}.0.op", ch, ch, 3)
            skip_chans.append(ch)
            block += 1
    if cfg.transformer_depth_middle >= -1:
        _resblock(s, "middle_block.0", ch, ch, emb)
        if cfg.transformer_depth_middle >= 0:
            _spatial_transformer(s, "middle_block.1", ch, cfg.transformer_depth_middle, cfg)
            _resblock(s, "middle_block.2", ch, ch, emb)
    block = 0
    for level in range(last, -1, -1):
        mult = cfg.channel_mult[level]
        for i in range(cfg.num_res_blocks[level] + 1):
            _resblock(s, f"output_blocks.{block}.0", ch + skip_chans.pop(), mc * mult, emb)
            ch = mc * mult
            sub = 1
            if cfg.transformer_depth[level]:
                _spatial_transformer(s, f"output_blocks.{block}.1", ch, cfg.transformer_depth[level], cfg)
                sub = 2
            if level and i == cfg.num_res_blocks[level]:
                _conv(s, f"output_blocks.{block}.{sub}.conv", ch, ch, 3)
            block += 1
    _norm(s, "out.0", ch)
    _conv(s, "out.2", cfg.out_channels, mc, 3)
    return s


def sd_unet_shapes(kind: str = "sd15", size: str = "tiny") -> Shapes:
    """LDM UNet key (no prefix) -> shape for 'sd15' | 'sdxl' at 'tiny' | 'small' | 'full'."""
    return unet_shapes(sd_unet_config(kind, size))


def param_count(shapes: Shapes) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


# --- weights ------------------------------------------------------------------------------------------

def iter_sd_tensors(shapes: Shapes, seed: int = 0, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random weights for UNet/CLIP shapes, one tensor at a time (norm gains near 1)."""
    return iter_random_tensors(shapes, seed, dtype)


def sd_unet_state_dict(kind: str = "sd15", size: str = "tiny", seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return dict(iter_sd_tensors(sd_unet_shapes(kind, size), seed, dtype))


def write_sd_unet(path, kind: str = "sd15", size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float16,
                  prefix: str = "", metadata: dict[str, str] | None = None, transform=None) -> None:
    """Write a UNet streaming; `transform(key, t)` may alter each fp32 tensor (e.g. to make a fine-tune)."""
    write_model(path, sd_unet_shapes(kind, size), seed, dtype, prefix, metadata, transform=transform)


def write_sd15_tiny(path, seed: int = 0, dtype: torch.dtype = torch.float16, prefix: str = "",
                    metadata: dict[str, str] | None = None, transform=None) -> None:
    """The tiny SD1.5 UNet file (~18.7M params) that ComfyUI's UNETLoader loads as SD15."""
    write_sd_unet(path, "sd15", "tiny", seed, dtype, prefix, metadata, transform)


# --- LDM <-> diffusers UNet names ------------------------------------------------------------------------

_RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_BASIC = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}
_ATTENTION_PARTS = ("norm.", "proj_in.", "proj_out.", "transformer_blocks.")
_BLOCK_KEY = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE_KEY = re.compile(r"^middle_block\.(\d+)\.(.+)$")


def _unknown(key: str) -> MismatchError:
    return MismatchError(f"UNet key {key!r} is not part of an SD1.5/SDXL LDM UNet, so it has no diffusers name "
                         "(pass UNet keys without a 'model.diffusion_model.' prefix)")


def _resnet_part(key: str, rest: str, diffusers_prefix: str) -> str:
    module, _, leaf = rest.rpartition(".")
    if module not in _RESNET:
        raise _unknown(key)
    return f"{diffusers_prefix}.{_RESNET[module]}.{leaf}"


def _attention_part(key: str, rest: str, diffusers_prefix: str) -> str:
    if not rest.startswith(_ATTENTION_PARTS):
        raise _unknown(key)
    return f"{diffusers_prefix}.{rest}"


UNetLayout = str | SDUNetConfig | Mapping[str, object] | Iterable[str]


def _keys_of(source: UNetLayout) -> list[str]:
    if isinstance(source, str):  # an architecture name: its real layout, the one real LoRAs target
        return list(sd_unet_shapes(source, "full"))
    if isinstance(source, SDUNetConfig):
        return list(unet_shapes(source))
    return list(source.keys() if isinstance(source, Mapping) else source)


Entry = tuple[int, str, str]  # (sub-module index inside the block, rest of the key, full key)


def _incomplete(what: str) -> MismatchError:
    return MismatchError(f"the UNet keys are incomplete ({what}), so block indices cannot be mapped; pass every key "
                         "of the UNet, a config, or the architecture name 'sd15' / 'sdxl'")


def _down_names(blocks: list[list[Entry]], out: dict[str, str]) -> list[int]:
    """Names the down path; returns the resnet count per level."""
    level = res = 0
    counts: list[int] = []
    for entries in blocks:
        if any(sub == 0 and rest.startswith("op.") for sub, rest, _ in entries):
            for sub, rest, key in entries:
                if sub != 0 or not rest.startswith("op."):
                    raise _unknown(key)
                out[key] = f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
            counts.append(res)
            level, res = level + 1, 0
            continue
        for sub, rest, key in entries:
            if sub == 0:
                out[key] = _resnet_part(key, rest, f"down_blocks.{level}.resnets.{res}")
            elif sub == 1:
                out[key] = _attention_part(key, rest, f"down_blocks.{level}.attentions.{res}")
            else:
                raise _unknown(key)
        res += 1
    return counts + [res]


def _mid_names(entries: list[Entry], out: dict[str, str]) -> None:
    for sub, rest, key in entries:
        if sub in (0, 2):
            out[key] = _resnet_part(key, rest, f"mid_block.resnets.{sub // 2}")
        elif sub == 1:
            out[key] = _attention_part(key, rest, "mid_block.attentions.0")
        else:
            raise _unknown(key)


def _up_names(blocks: list[list[Entry]], out: dict[str, str]) -> list[int]:
    """Names the up path; returns the resnet count per level."""
    level = res = 0
    counts: list[int] = []
    for entries in blocks:
        ends_level = False
        for sub, rest, key in entries:
            if sub == 0:
                out[key] = _resnet_part(key, rest, f"up_blocks.{level}.resnets.{res}")
            elif rest.startswith("conv."):  # Upsample, after the resnet (and the attention, if any)
                out[key] = f"up_blocks.{level}.upsamplers.0.conv.{rest[5:]}"
                ends_level = True
            elif sub == 1:
                out[key] = _attention_part(key, rest, f"up_blocks.{level}.attentions.{res}")
            else:
                raise _unknown(key)
        if ends_level:
            counts.append(res + 1)
            level, res = level + 1, 0
        else:
            res += 1
    return counts + [res] if res else counts


def ldm_to_diffusers_unet(source: UNetLayout) -> dict[str, str]:
    """LDM UNet key -> diffusers UNet2DConditionModel key, for 'sd15' | 'sdxl' (the real layout), a config,
    or the keys (or key -> shape mapping) of a UNet without prefix.

    The block structure is read from the keys alone: an input block holding `0.op` is a level's
    downsampler, an output block holding `<n>.conv` ends a level with its upsampler; the blocks between
    are resnets (sub-module 0) with their attention (sub-module 1) at consecutive diffusers indices.
    So the keys must be the whole UNet's (a LoRA's subset of targets would shift indices): a key outside
    that structure, or a key set with missing blocks, raises MismatchError.
    """
    out: dict[str, str] = {}
    blocks: dict[tuple[str, int], list[Entry]] = {}
    middle: list[Entry] = []
    for key in _keys_of(source):
        module, _, leaf = key.rpartition(".")
        if module in _BASIC:
            out[key] = f"{_BASIC[module]}.{leaf}"
        elif (m := _BLOCK_KEY.match(key)) is not None and not (m[1] == "input_blocks" and m[2] == "0"):
            blocks.setdefault((m[1], int(m[2])), []).append((int(m[3]), m[4], key))
        elif (m := _MIDDLE_KEY.match(key)) is not None:
            middle.append((int(m[1]), m[2], key))
        else:
            raise _unknown(key)

    def ordered(kind: str, first: int) -> list[list[Entry]]:
        indices = sorted(i for k, i in blocks if k == kind)
        if indices != list(range(first, first + len(indices))):
            raise _incomplete(f"{kind} indices {indices} have gaps")
        for i in indices:
            if not any(sub == 0 for sub, _, _ in blocks[(kind, i)]):
                raise _incomplete(f"{kind}.{i} has no resnet or downsampler keys")
        return [blocks[(kind, i)] for i in indices]

    down = _down_names(ordered("input_blocks", 1), out)
    _mid_names(middle, out)
    up = _up_names(ordered("output_blocks", 0), out)
    # each up level has one resnet more than its down level (it also takes the downsampler's skip)
    if (down != [0] or up) and up != [r + 1 for r in reversed(down)]:
        raise _incomplete(f"down levels have {down} resnets but up levels {up}; upsampler or downsampler keys missing?")
    return out


def diffusers_to_ldm_unet(source: UNetLayout) -> dict[str, str]:
    """diffusers UNet key -> LDM key; `source` is described in LDM keys (or a config), as for the forward map."""
    return {d: ldm for ldm, d in ldm_to_diffusers_unet(source).items()}


def kohya_unet_names(source: UNetLayout) -> dict[str, str]:
    """kohya LoRA module name (`lora_unet_down_blocks_0_attentions_0_proj_in`) -> LDM module name
    (`input_blocks.1.1.proj_in`), for every weight of the UNet."""
    out = {}
    for ldm, d in ldm_to_diffusers_unet(source).items():
        if ldm.endswith(".weight"):
            out["lora_unet_" + d[: -len(".weight")].replace(".", "_")] = ldm[: -len(".weight")]
    return out


# --- CLIP text encoders (ComfyUI in-model names) --------------------------------------------------------

@dataclass(frozen=True)
class ClipTextConfig:
    hidden: int
    intermediate: int
    layers: int
    vocab: int = 49408  # the real vocabulary even when narrow, so tokenizer ids stay valid
    positions: int = 77


CLIP_CONFIGS: dict[tuple[str, bool], ClipTextConfig] = {
    ("clip_l", False): ClipTextConfig(hidden=768, intermediate=3072, layers=12),
    ("clip_g", False): ClipTextConfig(hidden=1280, intermediate=5120, layers=32),
    # different small widths for the two, so a te1/te2 mix-up shows as a shape error
    ("clip_l", True): ClipTextConfig(hidden=64, intermediate=256, layers=2),
    ("clip_g", True): ClipTextConfig(hidden=96, intermediate=384, layers=2),
}


def clip_text_config(kind: str = "clip_l", layers: int | None = 2, small: bool = True) -> ClipTextConfig:
    """`layers=None` keeps the kind's real depth (12 for clip_l, 32 for clip_g)."""
    try:
        base = CLIP_CONFIGS[(kind, small)]
    except KeyError:
        raise ValueError(f"unknown CLIP text encoder {kind!r}; kinds: clip_l, clip_g") from None
    if layers is None:
        layers = CLIP_CONFIGS[(kind, False)].layers
    return ClipTextConfig(base.hidden, base.intermediate, layers, base.vocab, base.positions)


def clip_text_shapes(kind: str = "clip_l", layers: int | None = 2, small: bool = True) -> Shapes:
    """Key -> shape of ComfyUI's `SDClipModel` as it sits in a CLIP object (`clip_l.transformer.text_model...`,
    `clip_g....` for SDXL's second encoder); kohya calls these lora_te1_* / lora_te2_* in SDXL."""
    cfg = clip_text_config(kind, layers, small)
    d = cfg.hidden
    s: Shapes = {f"{kind}.logit_scale": ()}
    p = f"{kind}.transformer.text_model"
    s[f"{p}.embeddings.token_embedding.weight"] = (cfg.vocab, d)
    s[f"{p}.embeddings.position_embedding.weight"] = (cfg.positions, d)
    for n in range(cfg.layers):
        layer = f"{p}.encoder.layers.{n}"
        _norm(s, f"{layer}.layer_norm1", d)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(s, f"{layer}.self_attn.{proj}", d, d)
        _norm(s, f"{layer}.layer_norm2", d)
        _linear(s, f"{layer}.mlp.fc1", cfg.intermediate, d)
        _linear(s, f"{layer}.mlp.fc2", d, cfg.intermediate)
    _norm(s, f"{p}.final_layer_norm", d)
    _linear(s, f"{kind}.transformer.text_projection", d, d, bias=False)
    return s


def clip_text_state_dict(kind: str = "clip_l", layers: int | None = 2, small: bool = True, seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return dict(iter_sd_tensors(clip_text_shapes(kind, layers, small), seed, dtype))
