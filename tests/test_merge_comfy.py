"""Merge nodes in the real ComfyUI: the in-graph merge's effective weights (nested key patches and lazy
adapters, read ComfyUI's way) equal the file merge bit for bit; the guidance preset gives a file ComfyUI
loads as Flux dev (kept) or Flux schnell (dropped); the files node writes streaming, honours dry runs and
interrupts."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from comfy_support import apply_lora, effective_weights, flux_patcher, import_pack
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from weightsmith.merge import merge
from weightsmith.safetensors_io import StreamingWriter
from weightsmith.testmodels import FluxConfig, finetune, flux_shapes, flux_state_dict

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def nodes(comfy):
    return import_pack().NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def trio():
    base = flux_state_dict(FluxConfig(), "dev", seed=0)
    return base, finetune(base, seed=1, rank=4, scale=0.1, noise=0.01), finetune(base, seed=2, rank=4, scale=0.1)


def file_merge(tmp_path, models, name, **kw) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{name}.safetensors"
    merge(models, out, dtype="fp32", **kw)
    return load_file(out)


def assert_same_bits(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k].view(torch.int32), want[k].view(torch.int32)), k


def test_inputs_have_tooltips(nodes):
    for name in ("WeightsmithMergeModels", "WeightsmithMergeFiles"):
        cls = nodes[name]
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for inp, s in spec.get(group, {}).items():
                assert s[1].get("tooltip"), f"{name}.{inp}"
        # the file merge writes a file (an output node); the in-graph merge feeds one, as ModelMergeSimple
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and cls.DESCRIPTION
        assert cls.OUTPUT_NODE == (name == "WeightsmithMergeFiles")


def test_weighted_sum_in_graph_equals_file_merge(nodes, trio, tmp_path):
    a, b, c = trio
    node = nodes["WeightsmithMergeModels"]()
    rules = "@single=weight:0.1,0.6,0.3\n^img_in\\.=take:C"
    res = node.merge(flux_patcher(a), flux_patcher(b), "weighted_sum", "0.5, 0.3, 0.2", rules, "", "none", "take",
                     True, model_c=flux_patcher(c))
    merged, text, image = res["result"]
    # nested get_key_patches, as ModelMergeSimple builds them: nothing materialised
    entry = merged.patches["diffusion_model.double_blocks.0.img_attn.qkv.weight"][0]
    assert isinstance(entry[1], list)
    want = file_merge(tmp_path, [a, b, c], "ws", weights=[0.5, 0.3, 0.2], rules=rules.splitlines())
    assert_same_bits(effective_weights(merged), want)
    assert "per key group" in text and image.shape[0] == 1 and "weightsmith_report" in res["ui"]


@pytest.mark.parametrize("method,params,n", [
    ("ties", "density=0.4", 3),
    ("dare", "drop_rate=0.6, seed=11", 3),
    ("add_difference", "alpha=0.8", 3),
    ("slerp", "", 2),
    ("train_difference", "", 3),
    ("comparative_interpolation", "alpha=0.3, gamma=0.5, seed=4", 2),
])
def test_adapter_methods_in_graph_equal_file_merge(nodes, trio, tmp_path, method, params, n):
    """The lazy MergeAdapter patch evaluates the same fp32 method as the file merge: same bits. Model B
    carries a LoRA: both sides use its effective weights."""
    from comfy_support import effective_weights as eff

    a, b, c = trio
    lora = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(192, 4) * 0.1,
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(4, 64) * 0.1}
    pb, missing, refused = apply_lora(flux_patcher(b), lora, 0.7)
    assert not missing and not refused
    b_eff = eff(pb)
    patchers = [flux_patcher(a), pb, flux_patcher(c)][:n]
    res = nodes["WeightsmithMergeModels"]().merge(*patchers[:2], method, "", "", params, "none", "take", False,
                                                  *patchers[2:])
    merged = res["result"][0]
    adapters = [p[0][1] for p in merged.patches.values()]
    assert all(type(x).__name__ == "MergeAdapter" for x in adapters) and len(adapters) == len(a)
    want = file_merge(tmp_path, [a, b_eff, c][:n], method, method=method, params=params)
    assert_same_bits(effective_weights(merged), want)


def test_sdxl_block_weights_in_graph_equal_file_merge(nodes, tmp_path):
    """SDXL (a real comfy SDXL model at tiny width): in/mid/out block weights, in-graph = file, bit for bit."""
    from comfy_support import unet_patcher

    from weightsmith.sdunet import sd_unet_state_dict

    a, b = sd_unet_state_dict("sdxl", "tiny", seed=1), sd_unet_state_dict("sdxl", "tiny", seed=2)
    rules = "@in=weight:0.8,0.2\n@mid=weight:0.5,0.5\n@out=weight:0.2,0.8\n@label=take:B"
    res = nodes["WeightsmithMergeModels"]().merge(unet_patcher(a, "sdxl"), unet_patcher(b, "sdxl"), "weighted_sum", "",
                                                  rules, "", "none", "take", False)
    want = file_merge(tmp_path, [a, b], "sdxl", rules=rules.splitlines())
    assert_same_bits(effective_weights(res["result"][0]), want)


def test_in_graph_keeps_model_a_structure(nodes, tmp_path):
    """schnell as model_a, dev as model_b: guidance keys cannot be added in-graph, and say so; a drop rule
    keeps A's weight in-graph (a MODEL cannot lose a weight)."""
    dev = flux_state_dict(FluxConfig(), "dev", seed=3)
    schnell = finetune(flux_state_dict(FluxConfig(), "schnell", seed=3), seed=4)
    res = nodes["WeightsmithMergeModels"]().merge(flux_patcher(schnell), flux_patcher(dev), "weighted_sum", "", "^txt_in=drop",
                                                  "", "flux-guidance-keep", "take", False)
    merged, text, _ = res["result"]
    assert "4 keys are not in model_a" in text and "keep model_a's weight in-graph" in text
    got = effective_weights(merged)
    assert torch.equal(got["txt_in.weight"], schnell["txt_in.weight"])
    with pytest.raises(Exception, match="only in B"):
        nodes["WeightsmithMergeModels"]().merge(flux_patcher(schnell), flux_patcher(dev), "weighted_sum", "", "", "",
                                                "none", "error", False)


def _flux_3072_file(path, variant: str, value: float) -> None:
    """A 3072-wide, 1 double + 0 single block Flux file (what ComfyUI's detection needs); constant values
    per file are enough to see where each output tensor came from, and write fast."""
    cfg = FluxConfig(hidden=3072, depth=1, depth_single=0, num_heads=24, context_in=4096, vec_in=768)
    shapes = flux_shapes(cfg, variant)
    with StreamingWriter(path, {k: (s, torch.bfloat16) for k, s in shapes.items()}) as w:
        for k, s in shapes.items():
            w.write(k, torch.full(s, value, dtype=torch.bfloat16))


def _scratch_dir(tmp_path, need_bytes: int):
    """RAM-backed scratch space when there is room (these files are ~0.8 GB each), else tmp_path."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 3 * need_bytes:
        return tempfile.TemporaryDirectory(dir=shm, prefix="ws-merge-test-")
    return contextlib.nullcontext(str(tmp_path))


def test_guidance_preset_output_loads_as_flux_dev_or_schnell(comfy, tmp_path):
    """The must-show case at real width: dev + schnell with the guidance preset loads through ComfyUI's
    own loader (the UNETLoader path) as Flux (dev); dropping guidance loads as FluxSchnell. Whichever
    order the inputs come in."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.supported_models as sm

    with _scratch_dir(tmp_path, 3 << 30) as scratch:
        dev, schnell = Path(scratch) / "dev.safetensors", Path(scratch) / "schnell.safetensors"
        _flux_3072_file(dev, "dev", 0.25)
        _flux_3072_file(schnell, "schnell", -0.25)
        cases = [([schnell, dev], "flux-guidance-keep", sm.Flux), ([dev, schnell], "flux-guidance-drop", sm.FluxSchnell)]
        for inputs, preset, want in cases:
            out = Path(scratch) / f"{preset}.safetensors"
            merge(inputs, out, presets=preset)
            model = comfy.sd.load_diffusion_model(str(out), model_options={"dtype": torch.bfloat16})
            assert type(model.model.model_config) is want, preset
            with safe_open(str(out), "pt") as f:
                assert float(f.get_tensor("txt_in.weight")[0, 0]) == 0.0  # merged 0.5/0.5
                if want is sm.Flux:  # from the model that has one, although it is model B
                    assert float(f.get_tensor("guidance_in.in_layer.weight")[0, 0]) == 0.25
            del model
            mm.unload_all_models()
            mm.soft_empty_cache()
            out.unlink()


@pytest.fixture
def model_dirs(tmp_path, monkeypatch, comfy, trio):
    import folder_paths

    dm = tmp_path / "diffusion_models"
    dm.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(dm)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(tmp_path / "ckpt")], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out))
    for name, sd in zip("abc", trio):
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(dm / f"{name}.safetensors"))
    return dm, out


def test_files_node_writes_the_core_merge(nodes, model_dirs, tmp_path):
    dm, out_dir = model_dirs
    node = nodes["WeightsmithMergeFiles"]
    names = node.INPUT_TYPES()["required"]["model_a"][0]
    assert "diffusion_models/a.safetensors" in names
    res = node().merge("diffusion_models/a.safetensors", "diffusion_models/b.safetensors", "ties", "", "@txt=take:B",
                       "density=0.5", "none", "take", "copy", "keep", False, "output", "merges/test",
                       model_c="diffusion_models/c.safetensors", model_d="none")
    path, text, image = res["result"]
    assert path == str(out_dir / "merges" / "test_00001_.safetensors")
    want = tmp_path / "want.safetensors"
    merge([dm / f"{n}.safetensors" for n in "abc"], want, "ties", rules=["@txt=take:B"], params={"density": 0.5})
    got, ref = load_file(path), load_file(want)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k].view(torch.int16), ref[k].view(torch.int16)), k
    assert "wrote" in text and image.shape[-1] == 3 and "weightsmith_json" in res["ui"]


def test_files_node_dry_run_and_interrupt(nodes, model_dirs):
    import comfy.model_management as mm

    dm, out_dir = model_dirs
    node = nodes["WeightsmithMergeFiles"]()
    args = ("diffusion_models/a.safetensors", "diffusion_models/b.safetensors", "weighted_sum", "0.7,0.3", "", "",
            "none", "take", "copy", "bf16")
    path, text, _ = node.merge(*args, True, "output", "dry/x")["result"]
    assert path == "" and "dry run: nothing written" in text and "cos(A,B)" in text
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node.merge(*args, False, "diffusion_models", "interrupted/x")
    finally:
        mm.interrupt_current_processing(False)
    leftovers = [p for p in list(dm.rglob("*")) + list(out_dir.rglob("*")) if p.is_file()]
    assert sorted(p.name for p in leftovers) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    with pytest.raises(Exception, match="takes 3 models"):
        node.merge(*args[:2], "add_difference", *args[3:], False, "output", "x")
