"""Every LoRA format this project writes, for Flux, Chroma, SD1.5 and SDXL (tiny layouts), loads in the real ComfyUI (its own
key map and LoRA loader) with zero "lora key not loaded", and the patched weights equal base + ΔW.
Formats ComfyUI 0.3.75 cannot load itself (XLabs, PEFT-on-BFL) become loadable after conversion; a BFL
control LoRA converted to the comfy format patches exactly like ComfyUI's own loading of the original."""

from __future__ import annotations

import pytest
import torch
from comfy_support import apply_lora, effective_weights, flux_patcher, unet_patcher

from weightsmith.lora.formats import WRITABLE_FORMATS, load_lora, lora_state_dict, save_lora
from weightsmith.lora.keymaps import weight_key
from weightsmith.lora.model import LoRA
from weightsmith.lora.testloras import random_lora
from weightsmith.sdunet import sd_unet_state_dict
from weightsmith.sources import DictSource
from weightsmith.testmodels import FluxConfig, flux_state_dict

pytestmark = pytest.mark.comfy
CFG = FluxConfig()
H = CFG.hidden
STRENGTH = 0.75


@pytest.fixture(scope="module")
def models(comfy):
    """(state dict, patcher) per architecture, built once."""
    out = {}
    for arch, variant in (("flux", "dev"), ("chroma", "chroma")):
        sd = flux_state_dict(CFG, variant, seed=1)
        out[arch] = (sd, flux_patcher(sd))
    for arch in ("sd15", "sdxl"):
        sd = sd_unet_state_dict(arch, "tiny", seed=2)
        out[arch] = (sd, unet_patcher(sd, arch))
    return out


def expected_weights(base: dict, lora: LoRA, strength: float) -> dict[str, torch.Tensor]:
    exp = {}
    for name, mod in lora.modules.items():
        key = weight_key(name)
        exp[key] = base[key].float() + strength * mod.dense_delta(tuple(base[key].shape))
        if mod.diff_b is not None:
            bkey = key[: -len(".weight")] + ".bias"
            exp[bkey] = base[bkey].float() + strength * mod.diff_b.float()
    return exp


def check_applies_exactly(patcher, base, sd, lora, strength=STRENGTH):
    clone, missing, refused = apply_lora(patcher, sd, strength)
    assert missing == [] and refused == []
    exp = expected_weights(base, lora, strength)
    got = effective_weights(clone)
    for key, want in exp.items():
        err = float((got[key].detach() - want).abs().max())
        assert err <= 1e-6 + 1e-5 * float(want.abs().max()), f"{key}: max error {err}"
    untouched = [k for k in base if k not in exp and k in got]
    assert untouched and all(torch.equal(got[k], base[k].float()) for k in untouched)


@pytest.mark.parametrize("arch", ["flux", "chroma", "sd15", "sdxl"])
@pytest.mark.parametrize("fmt", WRITABLE_FORMATS)
def test_every_written_format_loads_fully_and_exactly(models, arch, fmt):
    base, patcher = models[arch]
    # Chroma's guidance layer has no ComfyUI-loadable diffusers/OneTrainer name (those writers refuse it)
    every = arch != "chroma" or fmt in ("comfy", "kohya")
    lora = random_lora({k: tuple(v.shape) for k, v in base.items()}, arch, rank=4, seed=5,
                       targets=None if every else lambda k: not k.startswith("distilled_guidance_layer."))
    sd = lora_state_dict(lora, fmt)
    check_applies_exactly(patcher, base, sd, lora)


@pytest.mark.parametrize("fmt", ["comfy", "kohya"])
def test_bias_changes_load(models, fmt):
    base, patcher = models["flux"]
    lora = random_lora({k: tuple(v.shape) for k, v in base.items()}, "flux", rank=2, seed=6, with_bias=True)
    check_applies_exactly(patcher, base, lora_state_dict(lora, fmt), lora, strength=1.0)


def test_saved_bf16_file_loads_through_comfy_file_loader(models, tmp_path):
    import comfy.utils

    base, patcher = models["flux"]
    lora = random_lora({k: tuple(v.shape) for k, v in base.items()}, "flux", rank=4, seed=7)
    path = save_lora(lora, tmp_path / "l.safetensors", fmt="kohya", dtype=torch.bfloat16)
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    as_saved = load_lora(path)  # the bf16-rounded factors are what ComfyUI sees too
    check_applies_exactly(patcher, base, sd, as_saved)


def xlabs_state_dict(seed=8):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for proc, rows in (("qkv_lora1", 3 * H), ("qkv_lora2", 3 * H), ("proj_lora1", H), ("proj_lora2", H)):
        sd[f"double_blocks.0.processor.{proc}.down.weight"] = torch.randn(4, H, generator=g) * 0.1
        sd[f"double_blocks.0.processor.{proc}.up.weight"] = torch.randn(rows, 4, generator=g) * 0.1
    return sd


def test_xlabs_is_not_loaded_by_comfy_but_converts_to_a_loadable_file(models):
    base, patcher = models["flux"]
    xlabs = xlabs_state_dict()
    _, missing, _ = apply_lora(patcher, xlabs)
    assert len(missing) == len(xlabs)  # ComfyUI 0.3.75 alone loads none of it
    lora = load_lora(xlabs)
    for fmt in WRITABLE_FORMATS:
        check_applies_exactly(patcher, base, lora_state_dict(lora, fmt), lora)


def test_peft_bfl_converts_to_a_loadable_file(models):
    base, patcher = models["flux"]
    ref = random_lora({k: tuple(v.shape) for k, v in base.items()}, "flux", rank=3, seed=9, alpha=None,
                      targets=lambda k: k.startswith(("double_blocks.", "single_blocks.")))
    peft = {k.replace("diffusion_model.", "base_model.model.").replace("lora_up", "lora_B").replace("lora_down", "lora_A"): v
            for k, v in lora_state_dict(ref, "comfy").items()}
    _, missing, _ = apply_lora(patcher, peft)
    assert missing  # ComfyUI has no base_model.model. map for Flux
    lora = load_lora(peft)
    assert lora.source_format == "peft_bfl"
    check_applies_exactly(patcher, base, lora_state_dict(lora, "kohya"), lora)


def test_bfl_control_converted_patches_like_comfys_own_loader(models):
    base, patcher = models["flux"]
    g = torch.Generator().manual_seed(10)
    sd = {"single_blocks.0.norm.key_norm.scale": 1 + 0.1 * torch.randn(CFG.head_dim, generator=g),
          "double_blocks.0.img_attn.norm.query_norm.scale": 1 + 0.1 * torch.randn(CFG.head_dim, generator=g)}
    for key, shape in (("double_blocks.0.img_attn.qkv", (3 * H, H)), ("txt_in", (H, CFG.context_in)),
                       ("img_in", (H, 2 * CFG.in_channels))):
        sd[f"{key}.lora_A.weight"] = torch.randn(4, shape[1], generator=g) * 0.1
        sd[f"{key}.lora_B.weight"] = torch.randn(shape[0], 4, generator=g) * 0.1
        sd[f"{key}.lora_B.bias"] = torch.randn(shape[0], generator=g) * 0.1
    native, missing, refused = apply_lora(patcher, sd)  # ComfyUI converts BFL control LoRAs itself
    assert missing == [] and refused == []
    ours = load_lora(sd)
    assert ours.source_format == "bfl_control" and not ours.unknown_keys
    clone, missing, refused = apply_lora(patcher, lora_state_dict(ours, "comfy"))
    assert missing == [] and refused == []
    want, got = effective_weights(native), effective_weights(clone)
    assert got["img_in.weight"].shape == (H, 2 * CFG.in_channels)  # widened like ComfyUI does
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_sd15_diffusers_file_uses_names_comfy_maps(models):
    base, patcher = models["sd15"]
    lora = random_lora({k: tuple(v.shape) for k, v in base.items()}, "sd15", rank=2, seed=11)
    sd = lora_state_dict(lora, "diffusers")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight" in sd
    assert "unet.down_blocks.0.resnets.0.conv1.lora.up.weight" in sd
    back = load_lora(DictSource(sd, metadata=lora.metadata))
    assert set(back.modules) == set(lora.modules) and not back.unknown_keys
