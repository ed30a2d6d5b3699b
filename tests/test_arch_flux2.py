"""Flux.2 as a first-class architecture: a tiny model built from `comfy.supported_models.Flux2`, detected in its
BFL and diffusers names, inspected, and LoRAs extracted from it in every naming ComfyUI 0.3.75 loads for it,
loaded and applied by real ComfyUI; diffusers' own converters are the producers for the diffusers names."""

from __future__ import annotations

import pytest
import torch
from arch_support import (
    arch_refusal,
    assert_comfy_patches_exactly,
    assert_reads_back_exactly,
    deltas,
    expected_weights,
    inspect_checkpoint,
    only,
    tuned,
)
from comfy_support import dit_patcher, import_comfy

from weightsmith.arch import detect_arch
from weightsmith.errors import MismatchError
from weightsmith.lora.extract import extract_lora
from weightsmith.lora.formats import UnwritableError, load_lora, lora_state_dict
from weightsmith.sources import as_source

pytestmark = pytest.mark.comfy

# What ComfyUI 0.3.75 loads for Flux.2: every module in comfy and kohya names; in diffusers-style names
# (transformer.*, lycoris_*, lora_transformer_*) only the modules whose diffusers Flux.2 name is also Flux's.
WHOLE = ("comfy", "kohya")
DIFFUSERS_STYLE = ("diffusers", "lycoris", "onetrainer")
ATTENTION_AND_IO = ("_attn.qkv", "_attn.proj", "img_in", "txt_in", "final_layer.")


@pytest.fixture(scope="module")
def flux2():
    patcher, sd = dit_patcher("flux2")
    return patcher, sd


@pytest.fixture(scope="module")
def flux2_lora(flux2):
    _, sd = flux2
    want = tuned(sd)
    lora, _ = extract_lora(sd, want, rank=4, dtype="fp32")
    return lora, want


def _diffusers_sd(sd):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in sd.items()})


def test_key_set_is_comfyuis_and_detected_in_both_namings(flux2):
    patcher, sd = flux2
    comfy_keys = {k[len("diffusion_model."):] for k in patcher.model.state_dict() if k.startswith("diffusion_model.")}
    assert set(sd) == comfy_keys
    assert import_comfy().model_detection.detect_unet_config(sd, "")["image_model"] == "flux2"
    for prefix in ("", "model.diffusion_model."):
        info = detect_arch(as_source({prefix + k: v for k, v in sd.items()}))
        assert (info.arch, info.naming, info.prefix) == ("flux2", "bfl", prefix)
        assert (info.details["hidden"], info.details["double_blocks"], info.details["single_blocks"]) == (32, 2, 2)
        assert info.details["variant"].startswith("Flux.2") and info.details["guidance"] is True
    # diffusers' own single-file converter gives the names of its Flux2Transformer2DModel
    from diffusers import Flux2Transformer2DModel

    dsd = _diffusers_sd(sd)
    ref = Flux2Transformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                  axes_dims_rope=(4, 4, 4, 4))
    assert set(dsd) == set(ref.state_dict())
    for prefix in ("", "transformer."):
        info = detect_arch(as_source({prefix + k: v for k, v in dsd.items()}))
        assert (info.arch, info.naming, info.details["hidden"]) == ("flux2", "diffusers", 32)


def test_flux_is_not_taken_for_flux2():
    from weightsmith.testmodels import FluxConfig, flux_state_dict

    assert detect_arch(as_source(flux_state_dict(FluxConfig(), "dev"))).arch == "flux-dev"


def test_inspect_names_flux2(tmp_path, capsys, flux2):
    _, sd = flux2
    out = inspect_checkpoint(tmp_path, capsys, sd)
    assert "full model" in out and "flux2" in out and "variant=Flux.2" in out and "size=" in out


def test_extracted_lora_loads_in_comfy_whole_in_comfy_and_kohya(flux2, flux2_lora):
    patcher, sd = flux2
    lora, want = flux2_lora
    assert lora.arch == "flux2"
    # Flux.2 has no biases: every module is a `.weight` or a norm `.scale`; kohya names `.weight`s only
    scales = [n for n in lora.modules if n.endswith(".scale")]
    assert scales
    for fmt in WHOLE:
        part = lora if fmt == "comfy" else only(lora, lambda n: not n.endswith(".scale"))
        if fmt == "kohya":
            with pytest.raises(MismatchError, match="query_norm.scale"):
                lora_state_dict(lora, fmt)
        lsd = lora_state_dict(part, fmt)
        assert_comfy_patches_exactly(patcher, lsd, expected_weights(sd, want, part), fmt)
        assert_reads_back_exactly(part, lsd, fmt)


@pytest.mark.parametrize("fmt", DIFFUSERS_STYLE)
def test_diffusers_style_names_where_comfy_loads_them_and_refused_by_name_elsewhere(flux2, flux2_lora, fmt):
    patcher, sd = flux2
    lora, want = flux2_lora
    with pytest.raises(UnwritableError, match=r"format cannot hold .*img_mlp\.0 \(ComfyUI 0.3.75 does not load its "
                       r"diffusers Flux.2 name transformer_blocks.0.ff.linear_in") as e:
        lora_state_dict(lora, fmt)
    assert {"diffusion_model.single_blocks.0.linear1", "diffusion_model.double_stream_modulation_img.lin",
            "diffusion_model.time_in.in_layer"} <= set(e.value.modules)
    part = only(lora, lambda n: any(s in n for s in ATTENTION_AND_IO))
    assert any("img_attn.qkv" in n for n in part.modules) and any("final_layer.adaLN" in n for n in part.modules)
    lsd = lora_state_dict(part, fmt)
    if fmt == "diffusers":
        assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in lsd
        assert "transformer.norm_out.linear.lora_B.weight" in lsd
    assert_comfy_patches_exactly(patcher, lsd, expected_weights(sd, want, part), fmt)
    assert_reads_back_exactly(part, lsd, fmt, arch="flux2")


def test_reads_diffusers_flux2_lora_as_diffusers_converts_it(flux2_lora):
    """diffusers' own converter (ai-toolkit / ComfyUI layout -> diffusers) is the producer: every module, including
    the fused single-block `to_qkv_mlp_proj` and the SwiGLU `ff.linear_in`, reads back to the same change."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers

    lora, _ = flux2_lora
    # final_layer.adaLN_modulation.1 left out: this converter renames it to norm_out.linear without swapping the
    # scale/shift halves, unlike diffusers' own model converter and ComfyUI's key map (which both swap)
    linear = only(lora, lambda n: not n.endswith((".scale", "adaLN_modulation.1")))
    comfy = lora_state_dict(linear, "comfy")
    baked = {}
    for k, v in comfy.items():  # the converter takes alpha-free lora_A/lora_B pairs
        if k.endswith(".lora_up.weight"):
            m = k[: -len(".lora_up.weight")]
            down = comfy[m + ".lora_down.weight"]
            scale = float(comfy[m + ".alpha"]) / down.shape[0] if m + ".alpha" in comfy else 1.0
            baked[m + ".lora_B.weight"] = v * scale
            baked[m + ".lora_A.weight"] = down
    dsd = _convert_non_diffusers_flux2_lora_to_diffusers(baked)
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight" in dsd
    assert "transformer.transformer_blocks.0.ff.linear_in.lora_B.weight" in dsd
    back = load_lora(dsd)
    assert back.arch == "flux2" and not back.unknown_keys
    got, ref = deltas(lora_state_dict(back, "comfy")), deltas(comfy)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)


def test_attention_only_lora_fits_flux_and_flux2_but_full_ones_do_not(flux2_lora):
    from weightsmith.testmodels import FluxConfig, flux_state_dict

    lora, _ = flux2_lora
    comfy = lora_state_dict(lora, "comfy")
    assert load_lora(comfy).arch == "flux2"
    for other in ("flux", "qwen-image", "wan", "sdxl", "chroma"):
        with pytest.raises(MismatchError, match=arch_refusal("flux2", other)):
            load_lora(comfy, arch=other)
    base = flux_state_dict(FluxConfig(), "dev")
    flux_lora, _ = extract_lora(base, tuned(base), rank=2, dtype="fp32")
    with pytest.raises(MismatchError, match=arch_refusal("flux", "flux2")):
        load_lora(lora_state_dict(flux_lora, "comfy"), arch="flux2")
    attn = lora_state_dict(only(lora, lambda n: "_attn.qkv" in n), "comfy")
    assert load_lora(attn, arch="flux2").arch == "flux2" and load_lora(attn, arch="flux").arch == "flux"


def test_block_groups_address_flux2(tmp_path, flux2):
    from safetensors.torch import load_file, save_file

    from weightsmith.merge import merge, parse_rule

    assert parse_rule("@double.1=take:B").matches("double_blocks.1.img_mlp.0.weight")
    assert parse_rule("@single=take:B").matches("single_blocks.0.linear1.weight")
    assert parse_rule("@modulation=take:B").matches("double_stream_modulation_img.lin.weight")
    assert parse_rule("@modulation=take:B").matches("single_stream_modulation.lin.weight")
    _, sd = flux2
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    other = tuned(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(a))
    save_file({k: v.contiguous() for k, v in other.items()}, str(b))
    merge([a, b], out, "weighted_sum", [1.0, 0.0], rules=["@single.1=weight:0.5,0.5", "@modulation=take:B"])
    got = load_file(str(out))
    for k, v in sd.items():
        want = (0.5 * v + 0.5 * other[k] if k.startswith("single_blocks.1.") else
                other[k] if "stream_modulation" in k else v)
        torch.testing.assert_close(got[k], want, msg=k)
