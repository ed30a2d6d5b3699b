"""SD1.5 / SDXL UNet and CLIP layouts against ComfyUI's own modules, and the LDM <-> diffusers name map
against `comfy.utils.unet_to_diffusers` / `comfy.lora.model_lora_keys_unet`."""

from __future__ import annotations

import pytest
import torch

from weightsmith.errors import MismatchError
from weightsmith.safetensors_io import read_header
from weightsmith.sdunet import (
    clip_text_shapes,
    diffusers_to_ldm_unet,
    is_norm_gain,
    kohya_unet_names,
    ldm_to_diffusers_unet,
    param_count,
    sd_unet_config,
    sd_unet_shapes,
    sd_unet_state_dict,
    write_sd15_tiny,
)

ALL_SIZES = [(k, s) for k in ("sd15", "sdxl") for s in ("tiny", "small", "full")]


def meta_state(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def comfy_unet_shapes(comfy, kind, size):
    """ComfyUI's real UNetModel for the config, built on the meta device (no memory, even at full size)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = sd_unet_config(kind, size)
    model = UNetModel(**cfg.unet_model_kwargs(), device=torch.device("meta"), operations=comfy.ops.disable_weight_init)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.comfy
@pytest.mark.parametrize("kind,size", ALL_SIZES)
def test_shapes_equal_comfy_unet_model(comfy, kind, size):
    ours = sd_unet_shapes(kind, size)
    theirs = comfy_unet_shapes(comfy, kind, size)
    assert list(ours) == list(theirs)  # same keys, same order
    assert ours == theirs


@pytest.mark.comfy
@pytest.mark.parametrize("kind,size", ALL_SIZES)
def test_comfy_detection_reads_back_the_config(comfy, kind, size):
    cfg = sd_unet_config(kind, size)
    detected = comfy.model_detection.detect_unet_config(meta_state(sd_unet_shapes(kind, size)), "")
    assert detected == cfg.comfy_unet_config()


def test_full_parameter_counts():
    assert param_count(sd_unet_shapes("sd15", "full")) == 859_520_964
    assert param_count(sd_unet_shapes("sdxl", "full")) == 2_567_463_684
    tiny = sd_unet_shapes("sd15", "tiny")
    assert len(tiny) == 122 and 18_000_000 < param_count(tiny) < 19_000_000


def test_config_validation():
    from weightsmith.sdunet import SDUNetConfig

    with pytest.raises(ValueError, match="one entry per level"):
        SDUNetConfig(channel_mult=(1, 2), num_res_blocks=(1,), transformer_depth=(1, 1))
    with pytest.raises(ValueError, match="multiple of 32"):
        SDUNetConfig(model_channels=48, channel_mult=(1,), num_res_blocks=(1,), transformer_depth=(1,))
    with pytest.raises(ValueError, match="heads"):
        SDUNetConfig(model_channels=96, channel_mult=(1,), num_res_blocks=(1,), transformer_depth=(1,),
                     num_heads=-1, num_head_channels=64)
    with pytest.raises(ValueError, match="unknown SD UNet"):
        sd_unet_shapes("sd3", "tiny")


@pytest.mark.comfy
def test_tiny_sd15_file_loads_through_unet_loader_as_sd15(comfy, tmp_path):
    from comfy_support import LogCapture

    path = tmp_path / "sd15-tiny.safetensors"
    write_sd15_tiny(path, seed=3)
    header = read_header(path)
    assert {k: i.shape for k, i in header.tensors.items()} == sd_unet_shapes("sd15", "tiny")
    assert {i.dtype for i in header.tensors.values()} == {torch.float16}

    with LogCapture() as cap:
        patcher = comfy.sd.load_diffusion_model(str(path))
    assert type(patcher.model.model_config) is comfy.supported_models.SD15
    assert cap.matching("unet missing", "unet unexpected") == []

    loaded = patcher.model.diffusion_model.state_dict()
    expected = sd_unet_state_dict("sd15", "tiny", seed=3, dtype=torch.float16)
    assert set(loaded) == set(expected)
    for k, t in expected.items():
        assert torch.equal(loaded[k].to(torch.float16), t), k

    # and it runs: one denoising call at 8x8 latent
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 77, 768)
    with torch.no_grad():
        out = patcher.model.apply_model(x, torch.tensor([1.0]), c_crossattn=ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.comfy
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_small_sdxl_instantiates_as_comfy_sdxl(comfy, size):
    from comfy_support import LogCapture, unet_patcher

    sd = sd_unet_state_dict("sdxl", size, seed=1)
    with LogCapture() as cap:
        patcher = unet_patcher(sd, "sdxl")
    assert cap.matching("unet missing", "unet unexpected") == []
    assert isinstance(patcher.model, comfy.model_base.SDXL)
    loaded = patcher.model.diffusion_model.state_dict()
    assert all(torch.equal(loaded[k], t) for k, t in sd.items())
    with torch.no_grad():
        out = patcher.model.diffusion_model(torch.randn(1, 4, 8, 8), torch.tensor([10.0]),
                                            context=torch.randn(1, 4, 2048), y=torch.randn(1, 2816))
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_norm_gains_sit_near_one():
    sd = sd_unet_state_dict("sd15", "small", seed=0)
    gains = [k for k in sd if is_norm_gain(k)]
    # every GroupNorm/LayerNorm weight: 2 per resblock, 1 per attention, 3 per transformer block, out.0
    assert "out.0.weight" in gains and "input_blocks.1.0.in_layers.0.weight" in gains
    assert "input_blocks.1.1.transformer_blocks.0.norm2.weight" in gains and "input_blocks.1.1.norm.weight" in gains
    assert not any(is_norm_gain(k) for k in ("input_blocks.1.0.in_layers.2.weight", "out.0.bias", "out.2.weight"))
    for k in gains:
        assert (sd[k] - 1).abs().mean() < 0.1, k
    again = sd_unet_state_dict("sd15", "small", seed=0)
    assert all(torch.equal(sd[k], again[k]) for k in sd)


def comfy_pairs(comfy, kind, size):
    """comfy's diffusers -> LDM map as (ldm, diffusers) pairs, limited to keys the model has (comfy's
    map also lists keys that do not exist, e.g. the last level's downsampler) and to SD/SDXL names
    (it lists both class_embedding and add_embedding for label_emb; diffusers SDXL uses add_embedding)."""
    shapes = sd_unet_shapes(kind, size)
    m = comfy.utils.unet_to_diffusers(sd_unet_config(kind, size).comfy_unet_config())
    return {(ldm, d) for d, ldm in m.items() if ldm in shapes and not d.startswith("class_embedding.")}


@pytest.mark.comfy
@pytest.mark.parametrize("kind,size", ALL_SIZES)
def test_diffusers_map_equals_comfy(comfy, kind, size):
    shapes = sd_unet_shapes(kind, size)
    ours = ldm_to_diffusers_unet(shapes)
    assert set(ours) == set(shapes)  # every key named
    assert len(set(ours.values())) == len(ours)  # and no two on the same diffusers name
    assert set(ours.items()) == comfy_pairs(comfy, kind, size)
    assert ldm_to_diffusers_unet(sd_unet_config(kind, size)) == ours  # config or keys: same map
    if size == "full":
        assert ldm_to_diffusers_unet(kind) == ours  # an arch name means its real layout
    assert diffusers_to_ldm_unet(shapes) == {d: k for k, d in ours.items()}


def test_diffusers_names_spot_checks():
    m = ldm_to_diffusers_unet(sd_unet_shapes("sd15", "full"))
    assert m["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert m["input_blocks.3.0.op.weight"] == "down_blocks.0.downsamplers.0.conv.weight"
    assert m["input_blocks.4.0.skip_connection.weight"] == "down_blocks.1.resnets.0.conv_shortcut.weight"
    assert m["middle_block.2.out_layers.3.bias"] == "mid_block.resnets.1.conv2.bias"
    assert m["middle_block.1.proj_in.weight"] == "mid_block.attentions.0.proj_in.weight"
    assert m["output_blocks.2.1.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"
    assert m["output_blocks.5.2.conv.bias"] == "up_blocks.1.upsamplers.0.conv.bias"
    assert m["output_blocks.11.1.transformer_blocks.0.ff.net.2.weight"] == \
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight"
    assert m["out.2.weight"] == "conv_out.weight" and m["time_embed.2.bias"] == "time_embedding.linear_2.bias"
    xl = ldm_to_diffusers_unet(sd_unet_shapes("sdxl", "full"))
    assert xl["label_emb.0.0.weight"] == "add_embedding.linear_1.weight"
    assert xl["input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"] == \
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"


def test_unknown_unet_key_is_named():
    keys = list(sd_unet_shapes("sd15", "tiny"))
    for bad in ("model.diffusion_model.out.2.weight", "input_blocks.1.2.foo.weight", "middle_block.3.x.weight",
                "input_blocks.1.0.in_layers.7.weight", "input_blocks.0.1.weight"):
        with pytest.raises(MismatchError, match=bad.replace(".", r"\.")):
            ldm_to_diffusers_unet(keys + [bad])


def test_incomplete_key_sets_are_refused():
    keys = list(sd_unet_shapes("sd15", "small"))
    attention_only = [k for k in keys if ".transformer_blocks." in k]  # what a LoRA may target
    no_resnet = [k for k in keys if not k.startswith("input_blocks.1.0.")]
    no_downsampler = [k for k in keys if not k.startswith("input_blocks.3.")]
    no_upsampler = [k for k in keys if ".conv." not in k]
    for subset, needle in ((attention_only, "incomplete"), (no_resnet, "no resnet"), (no_downsampler, "gaps"),
                           (no_upsampler, "upsampler")):
        with pytest.raises(MismatchError, match=needle):
            ldm_to_diffusers_unet(subset)


@pytest.mark.comfy
@pytest.mark.parametrize("kind,size", [("sd15", "tiny"), ("sdxl", "small")])
def test_kohya_names_match_comfy_lora_key_map(comfy, kind, size):
    from comfy_support import unet_patcher

    sd = sd_unet_state_dict(kind, size, seed=0)
    patcher = unet_patcher(sd, kind)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    names = kohya_unet_names(sd)
    assert len(names) == sum(k.endswith(".weight") for k in sd)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in names
    for kohya, ldm_module in names.items():
        assert key_map[kohya] == f"diffusion_model.{ldm_module}.weight", kohya


@pytest.mark.comfy
def test_clip_shapes_equal_comfy_clip_and_lora_keys(comfy):
    import comfy.sd1_clip

    shapes = {**clip_text_shapes("clip_l"), **clip_text_shapes("clip_g")}
    configs = {}
    for kind in ("clip_l", "clip_g"):
        s = clip_text_shapes(kind)
        hidden = s[f"{kind}.transformer.text_model.final_layer_norm.weight"][0]
        configs[kind] = {
            "hidden_size": hidden, "intermediate_size": s[f"{kind}.transformer.text_model.encoder.layers.0.mlp.fc1.weight"][0],
            "num_attention_heads": 2, "num_hidden_layers": 2, "hidden_act": "gelu", "vocab_size": 49408,
            "max_position_embeddings": 77, "eos_token_id": 49407, "projection_dim": hidden,
        }
    holder = torch.nn.Module()  # what comfy's SDXLClipModel looks like from the outside
    holder.clip_l = comfy.sd1_clip.SDClipModel(textmodel_json_config=configs["clip_l"], device="meta")
    holder.clip_g = comfy.sd1_clip.SDClipModel(textmodel_json_config=configs["clip_g"], device="meta")
    theirs = {k: tuple(v.shape) for k, v in holder.state_dict().items()}
    assert shapes == theirs

    key_map = comfy.lora.model_lora_keys_clip(holder, {})
    layer_weights = [k for k in shapes if ".encoder.layers." in k and k.endswith("_proj.weight") or ".mlp.fc" in k and k.endswith(".weight")]
    assert len(layer_weights) == 2 * 2 * 6
    targets = set(key_map.values())
    assert all(k in targets for k in layer_weights)
    assert key_map["lora_te1_text_model_encoder_layers_1_self_attn_q_proj"] == \
        "clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
    assert key_map["lora_te2_text_model_encoder_layers_0_mlp_fc2"] == "clip_g.transformer.text_model.encoder.layers.0.mlp.fc2.weight"
    assert key_map["lora_te2_text_projection"] == "clip_g.transformer.text_projection.weight"


def test_clip_full_widths():
    full_l = clip_text_shapes("clip_l", layers=None, small=False)
    full_g = clip_text_shapes("clip_g", layers=None, small=False)
    assert full_l["clip_l.transformer.text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert "clip_l.transformer.text_model.encoder.layers.12.mlp.fc1.weight" not in full_l
    assert full_g["clip_g.transformer.text_model.encoder.layers.31.self_attn.out_proj.weight"] == (1280, 1280)
    assert param_count({k: v for k, v in full_l.items() if k != "clip_l.transformer.text_projection.weight"}) \
        == 123_060_481  # HF CLIPTextModel (ViT-L/14) 123,060,480 + logit_scale
