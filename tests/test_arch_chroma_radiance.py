"""Chroma Radiance where it differs from Chroma: a pixel-space model (patch conv `img_in_patch`, NeRF-style head
`nerf_*`) built from `comfy.supported_models.ChromaRadiance`; detected as Chroma, variant Chroma Radiance; its own
layers travel in ComfyUI's and kohya's names and are refused by name in diffusers-style names (which have none)."""

from __future__ import annotations

import pytest
from arch_support import (
    arch_refusal,
    assert_comfy_patches_exactly,
    assert_reads_back_exactly,
    expected_weights,
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

RADIANCE_ONLY = ("img_in_patch", "nerf_")


@pytest.fixture(scope="module")
def radiance():
    patcher, sd = dit_patcher("chroma-radiance")
    want = tuned(sd)
    lora, _ = extract_lora(sd, want, rank=4, dtype="fp32")
    return patcher, sd, want, lora


def test_key_set_is_comfyuis_and_detected(radiance):
    patcher, sd, _, _ = radiance
    comfy_keys = {k[len("diffusion_model."):] for k in patcher.model.state_dict() if k.startswith("diffusion_model.")}
    assert set(sd) == comfy_keys
    assert import_comfy().model_detection.detect_unet_config(sd, "")["image_model"] == "chroma_radiance"
    for prefix in ("", "model.diffusion_model."):
        info = detect_arch(as_source({prefix + k: v for k, v in sd.items()}))
        assert (info.arch, info.prefix, info.details["variant"], info.details["hidden"]) == (
            "chroma", prefix, "Chroma Radiance", 32)


@pytest.mark.parametrize("fmt", ["comfy", "kohya"])
def test_extracted_lora_loads_whole_in_comfy_and_kohya_names(radiance, fmt):
    patcher, sd, want, lora = radiance
    assert lora.arch == "chroma" and any(n.split(".", 1)[1].startswith(RADIANCE_ONLY) for n in lora.modules)
    part = lora if fmt == "comfy" else only(lora, lambda n: not n.endswith(".scale"))
    lsd = lora_state_dict(part, fmt)
    assert_comfy_patches_exactly(patcher, lsd, expected_weights(sd, want, part), fmt)
    assert_reads_back_exactly(part, lsd, fmt)


@pytest.mark.parametrize("fmt", ["diffusers", "lycoris", "onetrainer"])
def test_radiance_layers_refused_by_name_in_diffusers_style_names(radiance, fmt):
    patcher, sd, want, lora = radiance
    with pytest.raises(UnwritableError) as e:
        lora_state_dict(lora, fmt)
    assert {"diffusion_model.img_in_patch", "diffusion_model.nerf_blocks.0.param_generator"} <= set(e.value.modules)
    # split q/k/v take no bias change in these names: the weights' own changes only (store_diff off)
    plain, _ = extract_lora(sd, want, rank=4, dtype="fp32", store_diff=False)
    part = only(plain, lambda n: any(s in n for s in ("_attn.qkv", "_attn.proj", "txt_in")))
    lsd = lora_state_dict(part, fmt)
    assert_comfy_patches_exactly(patcher, lsd, expected_weights(sd, want, part), fmt)


def test_radiance_lora_refused_for_flux_and_others(radiance):
    _, _, _, lora = radiance
    comfy = lora_state_dict(lora, "comfy")
    with pytest.raises(MismatchError, match="Chroma LoRA"):
        load_lora(comfy, arch="flux")
    for other in ("qwen-image", "flux2", "sd3"):
        with pytest.raises(MismatchError, match=arch_refusal("chroma", other)):
            load_lora(comfy, arch=other)
