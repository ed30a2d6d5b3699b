"""Flux -> Chroma conversion (remap only: modulation layers dropped, every kept ΔW identical), other
architecture pairs refused, and the `convert` / `inspect` CLI."""

from __future__ import annotations

import json

import pytest
import torch

from weightsmith.cli import main
from weightsmith.errors import MismatchError
from weightsmith.lora import keymaps
from weightsmith.lora.convert import convert_lora, flux_to_chroma
from weightsmith.lora.formats import load_lora, lora_state_dict, save_lora
from weightsmith.lora.model import LoraTerm, ModuleDelta
from weightsmith.lora.testloras import random_lora
from weightsmith.sdunet import sd_unet_shapes
from weightsmith.testmodels import FluxConfig, flux_shapes

CFG = FluxConfig(depth=2, depth_single=2)
FLUX = flux_shapes(CFG, "dev")
CHROMA = flux_shapes(CFG, "chroma")
MODULATION = {
    "double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin", "double_blocks.1.img_mod.lin",
    "double_blocks.1.txt_mod.lin", "single_blocks.0.modulation.lin", "single_blocks.1.modulation.lin",
    "final_layer.adaLN_modulation.1", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
    "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
}


def full_flux_lora(seed=0):
    return random_lora(FLUX, "flux", rank=4, seed=seed, with_bias=True)


def test_flux_to_chroma_drops_exactly_the_modulation_modules():
    lora = full_flux_lora()
    out, report = flux_to_chroma(lora)
    dropped = {n[len(keymaps.DIFFUSION):] for n in report.dropped}
    assert dropped == MODULATION
    assert report.counts == {"applied": len(lora.modules) - len(MODULATION), "dropped": len(MODULATION), "unknown": 0}
    assert out.arch == "chroma" and set(out.modules) == set(lora.modules) - set(report.dropped)
    for name, mod in out.modules.items():
        src = lora.modules[name]
        assert all(a.up is b.up and a.down is b.down and a.alpha == b.alpha for a, b in zip(mod.terms, src.terms))
        assert mod.diff_b is src.diff_b
        key = name[len(keymaps.DIFFUSION):] + ".weight"
        assert CHROMA[key] == FLUX[key]  # every kept layer exists in Chroma with the same shape
    assert all(report.reasons[n] for n in report.dropped)
    assert "13 dropped" in report.text()


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "onetrainer", "comfy"])
def test_flux_to_chroma_from_every_format_including_diffusers_modulation_names(fmt):
    lora = random_lora(FLUX, "flux", rank=4, seed=1)
    sd = lora_state_dict(lora, fmt)
    if fmt == "diffusers":
        assert "transformer.transformer_blocks.0.norm1.linear.lora_A.weight" in sd
        assert "transformer.norm_out.linear.lora_A.weight" in sd
        assert "transformer.time_text_embed.guidance_embedder.linear_1.lora_A.weight" in sd
    out, report = flux_to_chroma(load_lora(sd))
    assert {n[len(keymaps.DIFFUSION):] for n in report.dropped} == MODULATION
    chroma_file = lora_state_dict(out, fmt)
    back = load_lora(chroma_file, arch="chroma")
    for name, mod in back.modules.items():
        key = name[len(keymaps.DIFFUSION):] + ".weight"
        torch.testing.assert_close(mod.dense_delta(CHROMA[key]), lora.modules[name].dense_delta(FLUX[key]))


def test_clip_text_encoder_modules_are_dropped_for_chroma_t5_kept():
    lora = random_lora(FLUX, "flux", rank=2, targets=["img_in.weight"])
    g = torch.Generator().manual_seed(0)
    clip = keymaps.te_name("clip_l", "text_model.encoder.layers.0.mlp.fc1")
    t5 = keymaps.te_name("t5xxl", "encoder.block.0.layer.0.SelfAttention.q")
    for n in (clip, t5):
        lora.modules[n] = ModuleDelta([LoraTerm(torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g))])
    out, report = flux_to_chroma(lora)
    assert report.dropped == [clip] and t5 in out.modules


def test_unknown_keys_are_carried_into_the_report():
    sd = lora_state_dict(random_lora(FLUX, "flux", rank=2, targets=["img_in.weight"]), "kohya")
    sd["lora_unet_img_in.oft_blocks"] = torch.ones(2, 2)  # OFT: a type weightsmith does not read
    out, report = flux_to_chroma(load_lora(sd))
    assert report.unknown == ["lora_unet_img_in.oft_blocks"] and out.unknown_keys == report.unknown


def test_wrong_architectures_are_refused_clearly():
    sd15 = random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=2)
    with pytest.raises(MismatchError, match="needs a Flux LoRA; this one is for sd15"):
        flux_to_chroma(sd15)
    with pytest.raises(MismatchError, match="cannot convert an SD1.5 LoRA to Chroma"):
        convert_lora(sd15, "chroma")
    with pytest.raises(MismatchError, match="cannot convert a Flux LoRA to SDXL"):
        convert_lora(full_flux_lora(), "sdxl")


def test_convert_lora_same_arch_and_chroma_back_to_flux():
    lora = full_flux_lora()
    same, report = convert_lora(lora, None)
    assert set(same.modules) == set(lora.modules) and not report.dropped
    chroma = random_lora(CHROMA, "chroma", rank=2, seed=2)
    flux, report = convert_lora(chroma, "flux")
    assert all(n.startswith("diffusion_model.distilled_guidance_layer.") for n in report.dropped) and report.dropped
    assert flux.arch == "flux"


def test_cli_convert_and_inspect(tmp_path, capsys):
    src = save_lora(random_lora(FLUX, "flux", rank=4), tmp_path / "in.safetensors", fmt="kohya", dtype=torch.bfloat16)
    out = tmp_path / "out.safetensors"
    rep = tmp_path / "r.json"
    assert main(["convert", str(src), "-o", str(out), "--to", "diffusers", "--target-arch", "chroma",
                 "--report", str(rep)]) == 0
    data = json.loads(rep.read_text())
    assert data["dropped"] == len(MODULATION) and data["output_format"] == "diffusers"
    back = load_lora(out)
    assert back.arch == "chroma" and back.source_format == "diffusers"
    assert main(["convert", str(src), "-o", str(out), "--to", "comfy"]) == 2  # never overwrites
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["inspect", str(out), "--modules", "--json", str(tmp_path / "i.json")]) == 0
    text = capsys.readouterr().out
    assert "chroma LoRA in diffusers format" in text and "double_blocks.0.img_attn.qkv" in text
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["kind"] == "lora" and info["arch"] == "chroma"


def test_cli_inspect_full_model_and_bad_input(tmp_path, capsys):
    from weightsmith.testmodels import write_model

    model = tmp_path / "m.safetensors"
    write_model(model, FLUX, seed=0)
    assert main(["inspect", str(model)]) == 0
    assert "full model, flux-dev" in capsys.readouterr().out
    assert main(["convert", str(model), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "full flux-dev model, not a LoRA" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    sd15 = save_lora(random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=2), tmp_path / "s.safetensors")
    assert main(["convert", str(sd15), "-o", str(tmp_path / "y.safetensors"), "--target-arch", "chroma"]) == 2
    assert "cannot convert an SD1.5 LoRA to Chroma" in capsys.readouterr().err


def test_cli_inspect_reports_nan_tensors(tmp_path, capsys):
    lora = random_lora(FLUX, "flux", rank=2, targets=["img_in.weight"])
    lora.modules["diffusion_model.img_in"].terms[0].up[0, 0] = float("nan")
    path = save_lora(lora, tmp_path / "nan.safetensors", fmt="kohya")
    assert main(["inspect", str(path)]) == 0
    assert "NaN or Inf: lora_unet_img_in.lora_up.weight" in capsys.readouterr().out
