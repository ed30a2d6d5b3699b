"""Flux -> Chroma in the real ComfyUI (a converted LoRA loads fully on a real Chroma model with identical ΔW),
`weightsmith verify`, and the LoRA nodes (load, convert, Flux->Chroma, save, apply) run in-process."""

from __future__ import annotations

import pytest
import torch
from comfy_support import apply_lora, effective_weights, flux_patcher, import_pack

from weightsmith.cli import main
from weightsmith.errors import MismatchError
from weightsmith.lora import keymaps
from weightsmith.lora.convert import flux_to_chroma
from weightsmith.lora.formats import WRITABLE_FORMATS, load_lora, lora_state_dict, save_lora
from weightsmith.lora.testloras import random_lora
from weightsmith.sdunet import sd_unet_shapes
from weightsmith.testmodels import FluxConfig, flux_shapes, flux_state_dict, write_model

pytestmark = pytest.mark.comfy
CFG = FluxConfig()


@pytest.fixture(scope="module")
def chroma(comfy):
    sd = flux_state_dict(CFG, "chroma", seed=3)
    return sd, flux_patcher(sd)


@pytest.fixture(scope="module")
def flux(comfy):
    sd = flux_state_dict(CFG, "dev", seed=4)
    return sd, flux_patcher(sd)


def flux_lora(seed=0):
    return random_lora(flux_shapes(CFG, "dev"), "flux", rank=4, seed=seed)  # every linear, modulations included


def assert_patched(clone, base, lora, strength=1.0):
    got = effective_weights(clone)
    for name, mod in lora.modules.items():
        key = keymaps.weight_key(name)
        want = base[key] + strength * mod.dense_delta(tuple(base[key].shape))
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("fmt", WRITABLE_FORMATS)
def test_flux_lora_converted_to_chroma_loads_fully(chroma, fmt):
    base, patcher = chroma
    lora = flux_lora()
    _, missing, refused = apply_lora(patcher, lora_state_dict(lora, fmt))
    # unconverted, the modulation keys are "not loaded" on Chroma (diffusers names: mapped, then silently refused)
    assert missing or refused
    converted, report = flux_to_chroma(lora)
    clone, missing, refused = apply_lora(patcher, lora_state_dict(converted, fmt))
    assert missing == [] and refused == []
    assert_patched(clone, base, converted)
    assert len(report.applied) + len(report.dropped) == len(lora.modules)


def test_verify_cli(tmp_path, flux, capsys):
    model = tmp_path / "chroma.safetensors"
    write_model(model, flux_shapes(CFG, "chroma"), seed=0)
    flux_model = tmp_path / "flux.safetensors"
    write_model(flux_model, flux_shapes(CFG, "dev"), seed=0)
    lora = save_lora(flux_lora(), tmp_path / "l.safetensors", fmt="kohya")
    assert main(["verify", str(lora), "--arch", "flux", "--model", str(flux_model)]) == 0
    assert "OK: every key loads" in capsys.readouterr().out
    assert main(["verify", str(lora), "--arch", "chroma", "--model", str(model)]) == 1
    out = capsys.readouterr().out
    assert "not loaded: lora_unet_double_blocks_0_img_mod_lin.lora_up.weight" in out and "--target-arch chroma" in out
    fixed = tmp_path / "c.safetensors"
    assert main(["convert", str(lora), "-o", str(fixed), "--target-arch", "chroma"]) == 0
    assert main(["verify", str(fixed), "--arch", "chroma", "--model", str(model)]) == 0
    # without --model: the full-size architecture built on the meta device; a tiny LoRA does not fit it
    assert main(["verify", str(lora), "--arch", "flux"]) == 1
    assert "does not fit weight (9216, 3072)" in capsys.readouterr().out


@pytest.fixture
def loras_dir(tmp_path, monkeypatch, comfy):
    import_pack()
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.clear()
    return tmp_path


def nodes():
    return import_pack().NODE_CLASS_MAPPINGS


def test_nodes_are_registered_with_tooltips():
    n = nodes()
    for cid in ("WeightsmithLoadLoRA", "WeightsmithSaveLoRA", "WeightsmithConvertLoRA", "WeightsmithFluxToChroma",
                "WeightsmithApplyLoRA", "WeightsmithReprojectFluxToChroma"):
        cls = n[cid]
        for kind, group in cls.INPUT_TYPES().items():
            if kind == "hidden":
                continue
            for name, spec in group.items():
                assert "tooltip" in spec[1], f"{cid}.{name}"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)


def test_load_convert_save_nodes(loras_dir):
    src = save_lora(flux_lora(), loras_dir / "in.safetensors", fmt="diffusers")
    loaded = nodes()["WeightsmithLoadLoRA"]().load("in.safetensors", "auto")
    lora, info = loaded["result"]
    assert "flux LoRA, diffusers format" in info and "weightsmith_report" in loaded["ui"]
    converted = nodes()["WeightsmithConvertLoRA"]().convert(lora, "kohya", "chroma")
    c_lora, report = converted["result"]
    assert c_lora.arch == "chroma" and c_lora.source_format == "kohya" and "13 dropped" not in report
    chroma_lora, text = nodes()["WeightsmithFluxToChroma"]().convert(lora)["result"]
    assert set(chroma_lora.modules) == set(c_lora.modules) and "dropped" in text
    saved = nodes()["WeightsmithSaveLoRA"]().save(c_lora, "sub/out", "same as input", "bf16")
    (path,) = saved["result"]
    assert path.startswith(str(loras_dir / "sub" / "out")) and path.endswith(".safetensors")
    again = load_lora(path)
    assert again.source_format == "kohya" and again.arch == "chroma"
    assert all(t.up.dtype == torch.bfloat16 for m in again.modules.values() for t in m.terms)
    second = nodes()["WeightsmithSaveLoRA"]().save(c_lora, "sub/out", "comfy", "keep")["result"][0]
    assert second != path and src.exists()


def test_apply_node_matches_comfys_loader(flux, chroma):
    base, patcher = flux
    lora = flux_lora(seed=5)
    (patched,) = nodes()["WeightsmithApplyLoRA"]().apply(patcher, lora, 0.5)
    reference, missing, _ = apply_lora(patcher, lora_state_dict(lora, "kohya"), 0.5)
    assert missing == []
    want, got = effective_weights(reference), effective_weights(patched)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    assert_patched(patched, base, lora, 0.5)
    # a Flux LoRA on Chroma: the layers Chroma lacks are left out, the rest applies unchanged
    c_base, c_patcher = chroma
    (on_chroma,) = nodes()["WeightsmithApplyLoRA"]().apply(c_patcher, lora, 1.0)
    assert_patched(on_chroma, c_base, flux_to_chroma(lora)[0])
    sd15 = random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=2)
    with pytest.raises(Exception, match="an SD1.5 LoRA does not fit this Flux dev model") as err:
        nodes()["WeightsmithApplyLoRA"]().apply(patcher, sd15, 1.0)
    assert type(err.value).__name__ == MismatchError.__name__  # the pack's own copy of the class


def test_reproject_node(loras_dir, monkeypatch):
    import folder_paths

    write_model(loras_dir / "flux.safetensors", flux_shapes(CFG, "dev"), seed=1)
    write_model(loras_dir / "chroma.safetensors", flux_shapes(CFG, "chroma"), seed=2)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(loras_dir)], {".safetensors"}))
    node = nodes()["WeightsmithReprojectFluxToChroma"]()
    out = node.convert(flux_lora(), "diffusion_models/flux.safetensors", "diffusion_models/chroma.safetensors",
                       "add_difference", 8, 1.0, 0, 0.5, 0.0,
                       1.0, 1.0)
    lora, text = out["result"]
    exact, _ = flux_to_chroma(flux_lora())
    assert lora.arch == "chroma" and set(lora.modules) == set(exact.modules) and "re-projected" in text
    for name, mod in lora.modules.items():
        shape = tuple(flux_shapes(CFG, "chroma")[keymaps.weight_key(name)])
        want = exact.modules[name].dense_delta(shape)
        assert float((mod.dense_delta(shape) - want).norm()) <= 1e-4 * float(want.norm())


@pytest.mark.parametrize("arch,encoders", [("flux", ("clip_l", "t5xxl")), ("chroma", ("t5xxl",)), ("sd15", ("clip_l",)),
                                           ("sdxl", ("clip_l", "clip_g"))])
def test_text_encoder_names_are_in_comfys_clip_key_map(arch, encoders):
    """`verify` builds ComfyUI's CLIP key map; every writable format's TE names must be in it."""
    from weightsmith.commands._comfy_verify import verify
    from weightsmith.lora.model import LoraTerm, ModuleDelta

    shapes = flux_shapes(CFG, "dev" if arch == "flux" else "chroma") if arch in ("flux", "chroma") else \
        sd_unet_shapes(arch, "tiny")
    lora = random_lora(shapes, arch, rank=2, targets=lambda k: k in ("img_in.weight", "input_blocks.0.0.weight"))
    for enc in encoders:
        hf = "encoder.block.3.layer.1.DenseReluDense.wi_0" if enc == "t5xxl" else "text_model.encoder.layers.5.mlp.fc2"
        lora.modules[keymaps.te_name(enc, hf)] = ModuleDelta([LoraTerm(torch.ones(8, 2), torch.ones(2, 8), alpha=1.0)])
    for fmt in WRITABLE_FORMATS:
        if fmt == "diffusers" and "t5xxl" in encoders:
            with pytest.raises(MismatchError, match="t5xxl"):
                lora_state_dict(lora, fmt)
            continue
        result = verify(lora_state_dict(lora, fmt), arch, shapes)
        assert result["not_loaded"] == [] and result["shape_errors"] == [], fmt
        assert result["loaded"] == len(lora.modules)
