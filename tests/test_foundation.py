"""Architecture detection, test-model layouts (checked against ComfyUI's own models), safe output paths, CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from weightsmith.arch import detect_arch
from weightsmith.errors import OutputPathError
from weightsmith.paths import next_free_path
from weightsmith.sources import DictSource
from weightsmith.testmodels import FluxConfig, flux_diffusers_shapes, flux_shapes, flux_state_dict


def _meta_source(shapes, prefix=""):
    return DictSource({prefix + k: torch.empty(s, device="meta") for k, s in shapes.items()})


@pytest.mark.parametrize(
    "variant,arch", [("dev", "flux-dev"), ("schnell", "flux-schnell"), ("chroma", "chroma")]
)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_detect_flux_family(variant, arch, prefix):
    info = detect_arch(_meta_source(flux_shapes(FluxConfig(hidden=64, depth=2, depth_single=3), variant), prefix))
    assert info.arch == arch and info.naming == "bfl" and info.prefix == prefix
    assert info.details == {"hidden": 64, "double_blocks": 2, "single_blocks": 3}


def test_detect_diffusers_flux_and_unknown():
    assert detect_arch(_meta_source(flux_diffusers_shapes(FluxConfig()), "transformer.")).arch == "flux-dev"
    assert detect_arch(_meta_source(flux_diffusers_shapes(FluxConfig(), guidance=False))).arch == "flux-schnell"
    info = detect_arch(_meta_source({"encoder.layer.0.weight": (4, 4)}))
    assert info.arch == "unknown" and "no Flux/Chroma/SDXL/SD1.5 key pattern" in info.reason


def test_full_size_flux_parameter_counts_match_the_real_models():
    from weightsmith.sdunet import param_count as count
    from weightsmith.testmodels import FLUX_FULL

    assert count(flux_shapes(FLUX_FULL, "dev")) == 11_901_408_320
    assert count(flux_shapes(FLUX_FULL, "schnell")) == 11_891_178_560


@pytest.mark.comfy
@pytest.mark.parametrize("variant,cls", [("dev", "Flux"), ("schnell", "FluxSchnell"), ("chroma", "Chroma")])
def test_flux_layouts_identical_to_comfyui_models(comfy, variant, cls):
    from comfy_support import flux_patcher

    sd = flux_state_dict(FluxConfig(), variant, seed=3)
    p = flux_patcher(sd)
    assert type(p.model.model_config).__name__ == cls
    model_sd = {k[len("diffusion_model."):]: t for k, t in p.model.state_dict().items() if k.startswith("diffusion_model.")}
    assert set(model_sd) == set(sd)
    assert all(tuple(model_sd[k].shape) == tuple(sd[k].shape) for k in sd)


@pytest.mark.parametrize(
    "bad", ["../escape", "/abs/path", "a/../../b", "nul\x00byte", "", "x" * 300, "C:evil", "sub/ok/../../../x", "a|b"]
)
def test_output_names_that_would_escape_are_refused(tmp_path, bad):
    with pytest.raises(OutputPathError):
        next_free_path(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


def test_counter_never_reuses_a_name(tmp_path):
    first = next_free_path(tmp_path, "merges/flux")
    assert first == tmp_path / "merges" / "flux_00001_.safetensors"
    first.write_bytes(b"x")
    assert next_free_path(tmp_path, "merges/flux").name == "flux_00002_.safetensors"


def test_symlinked_subfolder_pointing_outside_is_refused(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(OutputPathError, match="outside"):
        next_free_path(root, "link/x")


def test_cli_entry_points(tmp_path):
    out = tmp_path / "m.safetensors"
    r = subprocess.run([sys.executable, "-m", "weightsmith", "testmodels", "chroma", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from weightsmith.sources import open_model

    assert detect_arch(open_model(out)).arch == "chroma"
    r = subprocess.run([sys.executable, "-m", "weightsmith", "testmodels", "chroma", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
