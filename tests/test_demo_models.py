"""The demo models against real ComfyUI (issue 21 item 6, issue 17's Wan 2.2 expert pair): the ones the
demo calls loadable load through ComfyUI's own diffusion-model loader (what Load Diffusion Model runs),
the Wan pair as Wan with ComfyUI's exact key set; the hidden-64 Flux files do not, and every shipped
template that uses them says which demo models to take for the MODEL nodes instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from comfy_support import import_comfy

from weightsmith.demo import DEMO_DIR, LOADABLE_AS_MODEL, WAN_EXPERTS, make_demo_models, wan_shapes

pytestmark = pytest.mark.comfy

ROOT = Path(__file__).resolve().parents[1]
API_FILES = sorted((ROOT / "workflows" / "api").glob("*.json"))
MODEL_LOADERS = {"UNETLoader": "unet_name"}  # core loaders that turn a demo file into a MODEL


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return make_demo_models(tmp_path_factory.mktemp("demo"), full=False)


def _load(comfy, path: Path):
    return comfy.sd.load_diffusion_model(str(path))


def test_loadable_demo_models_load_as_a_model_in_comfyui(demo):
    comfy = import_comfy()
    loadable = [n for n in demo if n.startswith(LOADABLE_AS_MODEL) and "/loras/" not in str(demo[n])]
    assert len(loadable) >= 3 + 2 * len(WAN_EXPERTS), sorted(demo)
    for name in loadable:
        patcher = _load(comfy, demo[name])
        assert patcher is not None and patcher.model.diffusion_model is not None, name


def test_wan22_expert_pair_loads_as_wan_with_comfyuis_key_set(demo):
    comfy = import_comfy()
    for expert in WAN_EXPERTS:
        for suffix in ("", "-tuned"):
            patcher = _load(comfy, demo[f"wan2.2-t2v-{expert}-noise-tiny{suffix}.safetensors"])
            assert isinstance(patcher.model.model_config, comfy.supported_models.WAN21_T2V)
            held = {k: tuple(v.shape) for k, v in patcher.model.diffusion_model.state_dict().items()}
            assert held == wan_shapes()
    # the two experts are different models, and each tuned file is a fine-tune of its own expert
    from safetensors.torch import load_file

    hi, lo = (load_file(demo[f"wan2.2-t2v-{e}-noise-tiny.safetensors"]) for e in WAN_EXPERTS)
    hi_t = load_file(demo["wan2.2-t2v-high-noise-tiny-tuned.safetensors"])
    k = "blocks.0.self_attn.q.weight"
    assert not torch.equal(hi[k], lo[k])
    change = (hi_t[k].float() - hi[k].float()).norm() / hi[k].float().norm()
    assert 0 < change < 0.2


def test_tiny_flux_is_not_loadable_as_a_model_and_the_templates_say_so(demo):
    comfy = import_comfy()
    with pytest.raises(Exception, match="Hidden size 64"):
        _load(comfy, demo["flux1-dev-tiny.safetensors"])
    for path in API_FILES:
        prompt = json.loads(path.read_text())
        for node in prompt.values():  # a core loader in a template only ever gets a loadable demo model
            field = MODEL_LOADERS.get(node["class_type"])
            if field:
                name = node["inputs"][field].removeprefix(DEMO_DIR + "/")
                assert name.startswith(LOADABLE_AS_MODEL), f"{path.name}: {node['class_type']} loads {name}"
        tiny_flux = [v for n in prompt.values() for v in n["inputs"].values()
                     if isinstance(v, str) and "flux1-" in v and "-tiny" in v]
        if tiny_flux:
            note = path.with_suffix(".md")
            assert note.exists(), f"{path.name} uses {tiny_flux[0]} but has no note saying what it is for"
            text = note.read_text()
            assert "sd15-tiny" in text and "wan2.2" in text and "Load Diffusion Model" in text, (
                f"{note.name} does not say which demo models the MODEL nodes can load")


def test_readme_wan22_cli_example_extracts_and_bakes_a_pair(demo, tmp_path):
    """The README's Wan 2.2 loop: one extraction per expert, then each LoRA baked into its own expert gives
    back that expert's fine-tune (to bf16 rounding): the pair stays a pair."""
    from safetensors.torch import load_file

    from weightsmith.cli import main

    for e in WAN_EXPERTS:
        base, tuned = demo[f"wan2.2-t2v-{e}-noise-tiny.safetensors"], demo[f"wan2.2-t2v-{e}-noise-tiny-tuned.safetensors"]
        lora, baked = tmp_path / f"lora_{e}.safetensors", tmp_path / f"baked_{e}.safetensors"
        assert main(["extract", str(base), str(tuned), "-o", str(lora), "--rank", "16"]) == 0
        assert main(["bake", str(base), f"{lora}:1.0", "-o", str(baked), "--dtype", "bf16"]) == 0
        want, got = load_file(tuned), load_file(baked)
        assert set(want) == set(got)
        for k in want:
            w, g = want[k].float(), got[k].float()
            assert (g - w).norm() <= 0.02 * w.norm() + 1e-3, f"{e}: {k}"
