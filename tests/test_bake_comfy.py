"""Bake against the real ComfyUI 0.3.75: a chain of LoRA / LoKr / LoHa / DoRA files (made by LyCORIS) baked
into a file equals what a LoraLoaderModelOnly chain (`comfy.sd.load_lora_for_models`) patches, DoRA's order
included; the baked SD1.5 file loads through UNETLoader's `load_diffusion_model` with the patched weights of
the original; the node writes into diffusion_models, reports, and leaves nothing on interrupt."""

from __future__ import annotations

import pytest
import torch
from adapter_support import lycoris_network, module_tree, save_network
from comfy_support import effective_weights, flux_patcher, import_pack
from safetensors.torch import load_file, save_file

from weightsmith.bake import bake
from weightsmith.lora import keymaps
from weightsmith.lora.formats import load_lora, save_lora
from weightsmith.lora.testloras import random_lora
from weightsmith.sdunet import sd_unet_shapes, write_sd15_tiny
from weightsmith.testmodels import FluxConfig, flux_shapes, flux_state_dict

pytestmark = pytest.mark.comfy
CFG = FluxConfig()


def _flux_targets(key: str) -> bool:
    return any(p in key for p in ("img_attn.qkv", "txt_mlp.0", "linear1", "linear2", "img_in", "img_mod.lin"))


def comfy_chain(patcher, chain):
    """The model after LoraLoaderModelOnly x N: each LoRA file through comfy.sd.load_lora_for_models."""
    import comfy.sd
    import comfy.utils

    for path, strength in chain:
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(path), safe_load=True),
                                                   strength, 0)
    return patcher


def _lycoris(tmp_path, base, keep, name, algo, seed, **kw):
    net = lycoris_network(module_tree(base, keep), "lora_unet", algo, seed=seed, **kw)
    return save_network(net, tmp_path / f"{name}.safetensors")


def test_chain_of_adapter_types_equals_comfyui_chain(comfy, tmp_path):
    sd = flux_state_dict(CFG, "dev", seed=4)
    model = tmp_path / "flux.safetensors"
    save_file(sd, str(model))
    plain = tmp_path / "plain.safetensors"
    save_lora(random_lora(flux_shapes(CFG), "flux", rank=4, seed=5, with_bias=True, scale=0.1), plain, fmt="kohya")
    chain = [
        (plain, 0.7),
        (_lycoris(tmp_path, sd, _flux_targets, "lokr", "lokr", 1, factor=4), 0.8),
        (_lycoris(tmp_path, sd, _flux_targets, "dora", "lora", 2, dora_wd=True), 0.6),  # DoRA after others: order matters
        (_lycoris(tmp_path, sd, _flux_targets, "loha", "loha", 3), -0.5),
    ]
    out = tmp_path / "baked.safetensors"
    rep = bake(model, chain, out)
    assert rep.plan.unmatched == []
    assert {t.strip().split()[0] for i in rep.plan.loras for t in i.types.split(",")} >= {"lora", "lokr", "loha", "dora"}
    want = effective_weights(comfy_chain(flux_patcher(sd), chain))
    got = load_file(str(out))
    changed = 0
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-5, atol=1e-5, msg=k)
        changed += not torch.equal(got[k], sd[k])
    assert changed >= len(rep.patched) - 1 > 10
    # DoRA is not linear: the other order patches differently, and bake follows the order it is given
    swapped = [chain[2], chain[0], chain[1], chain[3]]
    bake(model, swapped, tmp_path / "swapped.safetensors")
    want2 = effective_weights(comfy_chain(flux_patcher(sd), swapped))
    got2 = load_file(str(tmp_path / "swapped.safetensors"))
    key = "double_blocks.0.img_attn.qkv.weight"
    torch.testing.assert_close(got2[key], want2[key], rtol=1e-5, atol=1e-5)
    assert float((got2[key] - got[key]).abs().max()) > 1e-4


def test_baked_sd15_file_loads_in_comfyui_with_the_patched_weights(comfy, tmp_path):
    import comfy.sd

    model = tmp_path / "sd15.safetensors"
    write_sd15_tiny(model, seed=3, dtype=torch.float16)
    base = {k: v.float() for k, v in load_file(str(model)).items()}

    def keep(k):
        return any(p in k for p in ("attn1.to_q", "attn2.to_k", "proj_in", "in_layers.2", "out.2"))

    plain = tmp_path / "plain.safetensors"
    save_lora(random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=4, seed=1, scale=0.1), plain, fmt="kohya")
    chain_files = [(plain, 1.0), (_lycoris(tmp_path, base, keep, "lokr", "lokr", 4, factor=4), 0.5),
                   (_lycoris(tmp_path, base, keep, "dora", "lora", 5, dora_wd=True), 0.8)]
    chain = []
    for path, s in chain_files:  # LyCORIS names the tiny UNet's own layout: say so, as the adapter tests do
        lora = load_lora(path, arch="sd15")
        lora.metadata[keymaps.SD_LAYOUT_META] = "sd15/tiny"
        chain.append((load_lora(path, arch="sd15") if path == plain else lora, s))
    out = tmp_path / "baked.safetensors"
    rep = bake(model, chain, out)
    assert rep.plan.unmatched == [] and len(rep.plan.patches) > 5

    patched = effective_weights(comfy_chain(comfy.sd.load_diffusion_model(str(model)), chain_files))
    loaded = comfy.sd.load_diffusion_model(str(out))
    assert type(loaded.model.model_config).__name__ == "SD15"
    baked = loaded.model.diffusion_model.state_dict()
    for k, w in patched.items():
        want = w.to(torch.float16).float()  # what a save of the patched fp16 model stores
        err = (baked[k].float() - want).abs()
        # one fp16 rounding apart at most (fp32 sums in another order may round the other way)
        assert bool((err <= want.abs() * 2 ** -10 + 1e-7).all()), (k, float(err.max()))
    assert sum(not torch.equal(baked[k].float(), base[k]) for k in patched) >= len(rep.patched)


@pytest.fixture
def folders(tmp_path, monkeypatch, comfy):
    import folder_paths

    dm = tmp_path / "diffusion_models"
    dm.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(dm)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(tmp_path / "ckpt")], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out))
    save_file(flux_state_dict(CFG, "dev", seed=2), str(dm / "flux.safetensors"))
    return dm


def test_bake_node_writes_reports_and_interrupts_cleanly(folders, tmp_path):
    import comfy.model_management as mm

    node = import_pack().NODE_CLASS_MAPPINGS["WeightsmithBakeLoRAs"]
    assert "diffusion_models/flux.safetensors" in node.INPUT_TYPES()["required"]["model"][0]
    l1 = random_lora(flux_shapes(CFG), "flux", rank=4, seed=1, scale=0.1)
    l2 = random_lora(flux_shapes(FluxConfig(depth=2)), "flux", rank=2, seed=2, scale=0.1)  # block 1: unmatched
    res = node().bake("diffusion_models/flux.safetensors", l1, 0.8, "@single=0.5", "bf16", False, "diffusion_models",
                      "baked/flux", lora_2=l2, strength_2=-0.4)
    path, text = res["result"]
    assert path == str(folders / "baked" / "flux_00001_.safetensors")
    assert "weightsmith_report" in res["ui"] and "weightsmith_json" in res["ui"]
    assert "match nothing" in text and "double_blocks.1" in text
    want = bake(folders / "flux.safetensors", [(l1, 0.8), (l2, -0.4)], tmp_path / "core.safetensors", dtype="bf16",
                rules=["@single=0.5"])
    assert want.patched and all(torch.equal(a, b) for a, b in zip(load_file(path).values(),
                                                                   load_file(str(tmp_path / "core.safetensors")).values()))
    before = sorted(p for p in folders.rglob("*") if p.is_file())
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node().bake("diffusion_models/flux.safetensors", l1, 1.0, "", "keep", False, "diffusion_models", "baked/x")
    finally:
        mm.interrupt_current_processing(False)
    assert sorted(p for p in folders.rglob("*") if p.is_file()) == before
    with pytest.raises(Exception, match="match nothing"):
        node().bake("diffusion_models/flux.safetensors", l2, 1.0, "", "keep", True, "diffusion_models", "baked/y")


@pytest.mark.parametrize("encoding", ["scaled_fp8", "mixed"])
def test_keep_on_a_quantized_model_writes_its_encoding_that_comfyui_loads(comfy, tmp_path, encoding):
    """`keep` on a ComfyUI scaled-fp8 / mixed-precision model: the baked file is in the model's encoding
    (fresh scales from the baked weights), UNETLoader's load_diffusion_model loads it, the weights ComfyUI
    dequantizes are exactly ours, and they equal, within fp8 rounding, what a LoraLoaderModelOnly chain
    patches into the model's decoded weights."""
    import comfy.sd
    from quant_support import dequantized, write_mixed, write_scaled_fp8
    from test_quant_encode_comfy import assert_comfy_equals_ours

    from weightsmith.sdunet import sd_unet_state_dict

    model = tmp_path / "model.safetensors"
    (write_scaled_fp8 if encoding == "scaled_fp8" else write_mixed)(model, sd_unet_state_dict("sd15", "tiny", seed=4))
    lora = tmp_path / "lora.safetensors"
    save_lora(random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=4, seed=2, scale=0.1), lora, fmt="kohya")
    out = tmp_path / "baked.safetensors"
    rep = bake(model, [(lora, 0.7)], out)
    assert rep.dtype == "keep" and rep.encodings and rep.patched
    config = assert_comfy_equals_ours(out, torch.float8_e4m3fn, legacy=encoding == "scaled_fp8")
    assert type(config).__name__ == "SD15"
    base, ours = dequantized(model), dequantized(out)
    assert set(ours) == set(base)
    plain = tmp_path / "decoded.safetensors"
    save_file(base, str(plain))
    want = effective_weights(comfy_chain(comfy.sd.load_diffusion_model(str(plain)), [(lora, 0.7)]))
    checked = 0
    for k, w in want.items():
        if k in rep.patched and k in ours:
            w = w.detach().float()
            torch.testing.assert_close(ours[k], w, rtol=2 ** -3, atol=float(w.abs().max()) * 2 ** -7, msg=k)
            checked += 1
    assert checked >= len(rep.patched) // 2
