"""Qwen-Image and Wan 2.1 as first-class architectures: detection, inspect, and LoRAs extracted in every
naming ComfyUI 0.3.75 maps for them, loaded and applied by real ComfyUI (tiny models built from
`comfy.supported_models` classes)."""

from __future__ import annotations

import pytest
import torch
from arch_support import arch_refusal, inspect_checkpoint
from arch_support import deltas as _deltas
from arch_support import tuned as _tuned
from arch_support import without as _without
from comfy_support import apply_lora, dit_patcher, effective_weights, import_comfy

from weightsmith.arch import detect_arch as _detect
from weightsmith.errors import MismatchError
from weightsmith.lora.extract import extract_lora
from weightsmith.lora.formats import detect_format, load_lora, lora_state_dict
from weightsmith.sources import as_source

pytestmark = pytest.mark.comfy

# What ComfyUI 0.3.75's model_lora_keys_unet maps, per architecture (Wan: only the generic two).
NAMINGS = {"qwen": ("comfy", "kohya", "diffusers", "lycoris"), "wan-t2v": ("comfy", "kohya"),
           "wan-i2v": ("comfy", "kohya")}
REFUSED = {"qwen": ("onetrainer",), "wan-t2v": ("diffusers", "onetrainer", "lycoris"),
           "wan-i2v": ("diffusers", "onetrainer", "lycoris")}


def _without_sd(comfy_sd, names):
    return {k: v for k, v in comfy_sd.items() if not any(k.startswith(n + ".") for n in names)}


def _base_for(want, base, names):
    keys = {n[len("diffusion_model."):] for n in names}
    return {k: (base[k] if k in keys else v) for k, v in want.items()}


@pytest.fixture(scope="module", params=["qwen", "wan-t2v", "wan-i2v"])
def model(request):
    patcher, sd = dit_patcher(request.param)
    return request.param, patcher, sd


def test_key_set_is_comfyuis_and_detected_with_and_without_prefix(model):
    kind, patcher, sd = model
    comfy_keys = {k[len("diffusion_model."):] for k in patcher.model.state_dict() if k.startswith("diffusion_model.")}
    assert set(sd) == comfy_keys
    for prefix in ("", "model.diffusion_model."):
        info = detect_arch({prefix + k: v for k, v in sd.items()})
        assert info.prefix == prefix
        if kind == "qwen":
            assert (info.arch, info.details["blocks"], info.details["hidden"]) == ("qwen-image", 2, 32)
        else:
            assert info.arch == "wan" and info.details["layers"] == 2 and info.details["dim"] == 32
            assert info.details["variant"] == kind.split("-")[1] and info.details["version"].startswith("2.1")
        # ComfyUI's own detection agrees on the family
        comfy = import_comfy()
        cfg = comfy.model_detection.detect_unet_config(sd, "")
        assert cfg["image_model"] == ("qwen_image" if kind == "qwen" else "wan2.1")


def test_wan22_variants_from_shapes():
    _, sd = dit_patcher("wan-t2v")
    i2v22 = dict(sd)
    w = i2v22["patch_embedding.weight"]
    i2v22["patch_embedding.weight"] = torch.zeros(w.shape[0], 36, *w.shape[2:])
    assert detect_arch(i2v22).details["variant"] == "i2v" and detect_arch(i2v22).details["version"] == "2.2"
    ti2v = dict(sd)
    ti2v["head.head.weight"] = torch.zeros(4 * 48, sd["head.head.weight"].shape[1])
    assert (detect_arch(ti2v).details["variant"], detect_arch(ti2v).details["version"]) == ("ti2v", "2.2")


def test_unknown_model_names_closest_architecture():
    _, sd = dit_patcher("qwen")
    broken = {k: v for k, v in sd.items() if k != "txt_norm.weight"}
    broken["transformer_blocks.0.attn.mystery.weight"] = torch.zeros(2, 2)
    info = detect_arch(broken)
    assert info.arch == "unknown"
    assert "closest is qwen-image" in info.reason and "transformer_blocks.0.attn.mystery.weight" in info.reason


def test_inspect_names_the_model(tmp_path, capsys, model):
    kind, _, sd = model
    out = inspect_checkpoint(tmp_path, capsys, sd)
    assert "full model" in out and ("qwen-image" if kind == "qwen" else "wan") in out
    assert "size=" in out


def test_extracted_lora_loads_in_comfy_in_every_naming_and_patches_base_to_tuned(tmp_path, model):
    kind, patcher, sd = model
    tuned = _tuned(sd)
    lora, _ = extract_lora(sd, tuned, rank=4, dtype="fp32")
    assert lora.arch == ("qwen-image" if kind == "qwen" else "wan")
    ref = lora_state_dict(lora, "comfy")
    want = dict(tuned)
    params = [n for n in lora.modules if n.endswith("modulation")]
    assert bool(params) == kind.startswith("wan")  # Wan's modulation parameters travel as diffs
    for fmt in NAMINGS[kind]:
        if fmt == "kohya" and params:  # lora_unet_* names `.weight`s only: the parameters are refused, by name
            with pytest.raises(MismatchError, match="blocks.0.modulation"):
                lora_state_dict(lora, fmt)
            lora, ref, want = _without(lora, params), _without_sd(ref, params), _base_for(want, sd, params)
        lsd = lora_state_dict(lora, fmt)
        if fmt == "diffusers":
            assert all(k.startswith("transformer.") for k in lsd)
        clone, missing, refused = apply_lora(patcher, lsd)
        assert missing == [] and refused == [], (fmt, missing[:3], refused[:3])
        eff = effective_weights(clone)
        for k, v in want.items():
            torch.testing.assert_close(eff[k], v, rtol=1e-4, atol=1e-5, msg=f"{fmt}: {k}")
        # reading the file back and writing it in ComfyUI's naming is exact
        back = load_lora(lsd)
        assert back.arch == lora.arch and detect_format(lsd) == fmt and not back.unknown_keys
        again, first = _deltas(lora_state_dict(back, "comfy")), _deltas(ref)
        assert set(again) == set(first)
        for k in first:
            torch.testing.assert_close(again[k], first[k], rtol=1e-6, atol=1e-7, msg=f"{fmt}: {k}")
    for fmt in REFUSED[kind]:
        with pytest.raises(MismatchError, match="format cannot hold .* module"):
            lora_state_dict(lora, fmt)


def test_lora_for_one_architecture_refused_for_another(model):
    kind, _, sd = model
    lora, _ = extract_lora(sd, _tuned(sd), rank=2, dtype="fp32")
    lsd = lora_state_dict(lora, "comfy")
    mine = "Qwen-Image" if kind == "qwen" else "Wan"
    with pytest.raises(MismatchError, match=f"{mine} LoRA, not a Flux one"):
        load_lora(lsd, arch="flux")


def detect_arch(sd):
    return _detect(as_source(sd))


def test_block_groups_address_qwen_and_wan_blocks(tmp_path):
    from weightsmith.merge import merge, parse_rule

    _, qwen = dit_patcher("qwen")
    _, wan = dit_patcher("wan-t2v")
    assert parse_rule("@blocks.1=take:B").matches("transformer_blocks.1.img_mlp.net.2.weight")
    assert parse_rule("@blocks.1=take:B").matches("blocks.1.ffn.0.weight")
    assert not parse_rule("@blocks.1=take:B").matches("blocks.10.ffn.0.weight")
    assert parse_rule("@img=take:B").matches("transformer_blocks.0.img_mod.1.weight")
    assert parse_rule("@txt=take:B").matches("transformer_blocks.0.txt_mlp.net.0.proj.weight")
    assert parse_rule("@cross=take:B").matches("blocks.0.cross_attn.k.weight")
    for name, sd in (("qwen", qwen), ("wan", wan)):
        a, b = tmp_path / f"{name}a.safetensors", tmp_path / f"{name}b.safetensors"
        tuned = _tuned(sd)
        from safetensors.torch import load_file, save_file

        save_file({"model.diffusion_model." + k: v.contiguous() for k, v in sd.items()}, str(a))
        save_file({"model.diffusion_model." + k: v.contiguous() for k, v in tuned.items()}, str(b))
        out = tmp_path / f"{name}.safetensors"
        merge([a, b], out, "weighted_sum", [1.0, 0.0], rules=["@blocks.1=weight:0.25,0.75"])
        got = load_file(str(out))
        for k, v in sd.items():
            want = 0.25 * v + 0.75 * tuned[k] if k.startswith(("blocks.1.", "transformer_blocks.1.")) else v
            torch.testing.assert_close(got["model.diffusion_model." + k], want, msg=k)


def test_inspect_explains_an_unknown_model(tmp_path, capsys):
    from safetensors.torch import save_file

    from weightsmith.cli import main

    _, sd = dit_patcher("qwen")
    broken = {k: v.contiguous() for k, v in sd.items() if k != "txt_norm.weight"}
    broken["transformer_blocks.0.attn.mystery.weight"] = torch.zeros(2, 2)
    path = tmp_path / "odd.safetensors"
    save_file(broken, str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "full model, unknown" in out and "closest is qwen-image" in out and "mystery" in out


def test_flux2_is_not_taken_for_flux_and_gets_no_flux_diffusers_names():
    from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict

    sd = flux_state_dict(FluxConfig(), "schnell", seed=0)
    sd = {k: v for k, v in sd.items() if "_mod." not in k and "modulation.lin" not in k}
    h = sd["img_in.weight"].shape[0]
    for name, rows in (("double_stream_modulation_img", 6), ("double_stream_modulation_txt", 6),
                       ("single_stream_modulation", 3)):
        sd[f"{name}.lin.weight"] = torch.randn(rows * h, h)
    assert import_comfy().model_detection.detect_unet_config(sd, "")["image_model"] == "flux2"
    info = detect_arch(sd)
    assert info.arch == "flux2" and info.lora_arch == "flux2"
    lora, _ = extract_lora(sd, finetune(sd, seed=2), rank=4, dtype="fp32")
    assert lora.arch == "flux2"
    with pytest.raises(MismatchError, match="format cannot hold .* module"):
        lora_state_dict(lora, "diffusers")
    assert lora_state_dict(lora, "comfy")


@pytest.mark.parametrize("keys,arch,variant", [
    ({"cap_embedder.1.weight": (3840, 2560), "layers.0.attention.qkv.weight": (4, 4)}, "lumina2", "Z-Image"),
    ({"cap_embedder.1.weight": (2304, 2304), "layers.0.attention.qkv.weight": (4, 4),
      "layers.0.adaLN_modulation.1.weight": (4, 4)}, "lumina2", "Lumina 2"),
    ({"caption_projection.0.linear.weight": (4, 4), "double_stream_blocks.0.x.weight": (4, 4)}, "hidream", None),
    ({"joint_blocks.0.context_block.attn.qkv.weight": (12, 4), "joint_blocks.0.x_block.attn2.qkv.weight": (12, 4),
      "x_embedder.proj.weight": (4, 16, 2, 2)}, "sd3", "SD3.5 Medium"),
])
def test_other_dits_detected_by_comfyuis_tell_tale_keys(keys, arch, variant):
    for prefix in ("", "model.diffusion_model."):
        info = detect_arch({prefix + k: torch.zeros(s) for k, s in keys.items()})
        assert info.arch == arch and info.prefix == prefix
        assert variant is None or info.details["variant"] == variant


def test_qwen_lora_on_input_projections_only_is_not_read_as_flux():
    """img_in/txt_in are named alike in Flux and Qwen-Image: Qwen-Image's txt_in width (3584, Qwen2.5-VL) decides, or
    the recorded architecture, or the caller's; an img_in-only LoRA (which fits both) takes the caller's."""
    from weightsmith.lora.model import LoRA, LoraTerm

    def lora_on(shapes, metadata=None):
        lo = LoRA(arch="unknown", source_format="comfy", metadata=metadata or {})
        for name, (out, inp) in shapes.items():
            lo.module("diffusion_model." + name).terms.append(LoraTerm(up=torch.randn(out, 2), down=torch.randn(2, inp)))
        return lora_state_dict(lo, "comfy")

    qwen = lora_on({"img_in": (3072, 64), "txt_in": (3072, 3584)})
    assert load_lora(qwen).arch == "qwen-image" and load_lora(qwen, arch="qwen-image").arch == "qwen-image"
    with pytest.raises(MismatchError, match=arch_refusal("qwen-image", "flux")):
        load_lora(qwen, arch="flux")
    assert load_lora(lora_on({"txt_in": (3072, 4096)})).arch == "flux"
    img_only = lora_on({"img_in": (3072, 64)})
    assert load_lora(img_only, arch="qwen-image").arch == "qwen-image" and load_lora(img_only, arch="flux").arch == "flux"
