"""Lossless mix nodes in the real ComfyUI: the MODEL node's effective weights (lazy adapter patches, read
ComfyUI's way and baked by ComfyUI's own loader) equal the core's file mix bit for bit on real Flux and
SD1.5 models, the README recipe (weighted-sum reference, then a || b) works in-graph, and the files node
writes the same file streaming, honours dry runs and interrupts."""

from __future__ import annotations

import pytest
import torch
from comfy_support import effective_weights, flux_patcher, import_pack, unet_patcher
from safetensors import safe_open
from safetensors.torch import save_file

from weightsmith.mix import lossless_mix
from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def nodes(comfy):
    mod = import_pack()
    return mod.NODE_CLASS_MAPPINGS


def flux_trio(seed=0):
    base = flux_state_dict(FluxConfig(), "dev", seed=seed)
    return (base, finetune(base, seed=seed + 1, rank=4, scale=0.05, noise=0.01),
            finetune(base, seed=seed + 2, rank=4, scale=0.05, noise=0.01))


def file_mix(tmp_path, a, b, c, name="ref", **kw) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{name}.safetensors"
    lossless_mix(a, b, c, out=out, **kw)
    with safe_open(str(out), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_bits(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype == torch.float32, k
        assert torch.equal(got[k].view(torch.int32), want[k].view(torch.int32)), k


def test_inputs_have_tooltips(nodes):
    for name in ("WeightsmithLosslessMix", "WeightsmithLosslessMixFiles"):
        cls = nodes[name]
        for spec in cls.INPUT_TYPES()["required"].values():
            assert spec[1].get("tooltip"), name
        # the file mix writes a file (an output node); the in-graph mix feeds one
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and cls.OUTPUT_NODE == name.endswith("Files")


@pytest.mark.parametrize("mode,alpha,beta", [("min_diff (nearest)", 0.95, 1.0), ("max_diff (farthest)", 1.0, 1.0)])
def test_model_node_equals_file_mix_on_flux(nodes, tmp_path, mode, alpha, beta):
    import comfy.model_management as mm

    a, b, c = flux_trio()
    pa, pb, pc = (flux_patcher(sd) for sd in (a, b, c))
    res = nodes["WeightsmithLosslessMix"]().mix(pa, pb, pc, alpha, beta, mode, True)
    mixed, text, image = res["result"]
    assert mixed is not pa and not pa.patches  # a clone; the input MODEL is untouched
    adapters = {type(p[-1][1]).__name__ for p in mixed.patches.values()}
    assert adapters == {"LosslessMixAdapter"} and len(mixed.patches) == len(a)
    want = file_mix(tmp_path, a, b, c, alpha=alpha, beta=beta, mode="max" if mode.startswith("max") else "min")
    assert_same_bits(effective_weights(mixed), want)
    # ComfyUI's own bake (patch_weight_to_device) gives the same weights
    mm.load_models_gpu([mixed], force_patch_weights=True)
    try:
        baked = {k: v.detach().clone() for k, v in mixed.model.diffusion_model.state_dict().items()}
    finally:
        mm.unload_all_models()
    assert_same_bits(baked, want)
    assert "from b" in text and "cos a~b" in text and "patched lazily" in text
    assert image.shape[0] == 1 and image.shape[-1] == 3 and float(image.max()) <= 1.0
    assert "weightsmith_report" in res["ui"] and "weightsmith_json" in res["ui"]


def test_model_node_equals_file_mix_on_sd15(nodes, tmp_path):
    from weightsmith.sdunet import sd_unet_state_dict

    base = sd_unet_state_dict("sd15", "tiny", seed=3)
    keys = sorted(base)[::4]
    b = finetune(base, seed=4, rank=4, scale=0.05, noise=0.01, keys=keys)
    c = finetune(base, seed=5, rank=4, scale=0.05, noise=0.01, keys=keys)
    pa, pb, pc = (unet_patcher(sd, "sd15") for sd in (base, b, c))
    mixed = nodes["WeightsmithLosslessMix"]().mix(pa, pb, pc, 1.0, 1.05, "min_diff (nearest)", False)["result"][0]
    assert_same_bits(effective_weights(mixed), file_mix(tmp_path, base, b, c, beta=1.05))


def test_recipe_weighted_sum_reference_then_a_or_b(nodes, tmp_path):
    """README recipe: ab = weighted sum of a and b (ComfyUI's ModelMergeSimple), then mix ab || a, b."""
    from comfy_extras.nodes_model_merging import ModelMergeSimple

    a, b, _ = flux_trio(seed=7)
    pa, pb = flux_patcher(a), flux_patcher(b)
    (ab,) = ModelMergeSimple().merge(pa, pb, 0.5)
    mixed, text, _ = nodes["WeightsmithLosslessMix"]().mix(ab, pa, pb, 1.0, 1.0, "min_diff (nearest)", True)["result"]
    ab_weights = effective_weights(ab)  # the reference as ComfyUI computes it (model1·0.5 + model2·0.5)
    got = effective_weights(mixed)
    assert_same_bits(got, file_mix(tmp_path, ab_weights, a, b))
    # every element comes from a or b, never the average
    for k in a:
        assert bool(((got[k] == a[k]) | (got[k] == b[k])).all()), k
    # a 0.5 weighted sum is equidistant from a and b: the picks are decided by ties and fp32 rounding of the
    # reference, not by the models; the report says so instead of leaving the user with a meaningless mix
    assert "WARNING: a is almost exactly a blend of b and c (a ≈ 0.50·b + 0.50·c" in text
    biased = nodes["WeightsmithLosslessMix"]().mix(ab, pa, pb, 0.98, 1.0, "min_diff (nearest)", True)["result"]
    assert "WARNING" not in biased[1]


def test_model_node_keeps_mismatching_keys(nodes):
    a, b, _ = flux_trio(seed=9)
    schnell = flux_state_dict(FluxConfig(), "schnell", seed=10)
    pa, pb, pc = flux_patcher(a), flux_patcher(b), flux_patcher(schnell)
    res = nodes["WeightsmithLosslessMix"]().mix(pa, pb, pc, 1.0, 1.0, "min_diff (nearest)", False)
    mixed, text, _ = res["result"]
    assert not any(k.startswith("diffusion_model.guidance_in.") for k in mixed.patches)
    assert "kept from a (missing)" in text
    got = effective_weights(mixed)
    assert torch.equal(got["guidance_in.in_layer.weight"], a["guidance_in.in_layer.weight"])


@pytest.fixture
def model_dirs(tmp_path, monkeypatch, comfy):
    import folder_paths

    dm = tmp_path / "diffusion_models"
    dm.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(dm)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(tmp_path / "ckpt")], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    a, b, c = flux_trio(seed=11)
    for name, sd in zip("abc", (a, b, c)):
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(dm / f"{name}.safetensors"))
    return dm


def test_files_node_writes_the_core_mix(nodes, model_dirs, tmp_path):
    node = nodes["WeightsmithLosslessMixFiles"]
    names = node.INPUT_TYPES()["required"]["model_a"][0]
    assert "diffusion_models/a.safetensors" in names
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        res = node().mix("diffusion_models/a.safetensors", "diffusion_models/b.safetensors",
                         "diffusion_models/c.safetensors", 0.95, 1.0, "max_diff (farthest)", True, False, False,
                         False, "diffusion_models", "mixes/test")
    path, text, image = res["result"]
    assert path.endswith("mixes/test_00001_.safetensors") and path.startswith(str(model_dirs))
    want_path = tmp_path / "want.safetensors"
    lossless_mix(*(model_dirs / f"{n}.safetensors" for n in "abc"), alpha=0.95, mode="max", out=want_path)
    with safe_open(path, "pt") as f, safe_open(str(want_path), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for k in f.keys():
            assert torch.equal(f.get_tensor(k).view(torch.int16), g.get_tensor(k).view(torch.int16)), k
    assert "wrote" in text and image.shape[-1] == 3


def test_files_node_dry_run_and_interrupt(nodes, model_dirs):
    import comfy.model_management as mm

    node = nodes["WeightsmithLosslessMixFiles"]()
    args = ("diffusion_models/a.safetensors", "diffusion_models/b.safetensors", "diffusion_models/c.safetensors",
            1.0, 1.0, "min_diff (nearest)", True, False, False)
    before = sorted(p.relative_to(model_dirs) for p in model_dirs.rglob("*"))
    path, text, _ = node.mix(*args, True, "diffusion_models", "dry/x")["result"]
    assert path == "" and "dry run: nothing written" in text and "cos a~b" in text
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node.mix(*args, False, "diffusion_models", "interrupted/x")
    finally:
        mm.interrupt_current_processing(False)
    after = sorted(p.relative_to(model_dirs) for p in model_dirs.rglob("*") if p.is_file())
    assert after == [p for p in before if (model_dirs / p).is_file()]  # no partial or temp file anywhere
    with pytest.raises(Exception, match="nothing to mix"):
        node.mix(*args[:6], False, False, False, False, "diffusion_models", "x")
