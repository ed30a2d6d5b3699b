"""Z-Image and Lumina 2 as first-class architectures: tiny models built from `comfy.supported_models.ZImage` /
`Lumina2`, detected in ComfyUI's and diffusers' names, inspected, and LoRAs extracted in every naming ComfyUI 0.3.75
loads for them (comfy, kohya, ai-toolkit's `diffusion_model.<diffusers name>`, SimpleTuner's `lycoris_*`), loaded and
applied by real ComfyUI; diffusers' own Z-Image LoRA converter reads what we write."""

from __future__ import annotations

import re

import pytest
import torch
from arch_support import (
    arch_refusal,
    assert_comfy_patches_exactly,
    assert_reads_back_exactly,
    deltas,
    expected_weights,
    inspect_checkpoint,
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


@pytest.fixture(scope="module", params=["zimage", "lumina2"])
def model(request):
    patcher, sd = dit_patcher(request.param)
    lora, _ = extract_lora(sd, want := tuned(sd), rank=4, dtype="fp32")
    return request.param, patcher, sd, want, lora


def _native_to_diffusers(sd):
    """ComfyUI's own diffusers -> ComfyUI table, inverted: the Z-Image checkpoint diffusers would write."""
    import comfy.utils

    table = comfy.utils.z_image_to_diffusers({"n_layers": 2, "dim": 32})
    out = {}
    for d, target in table.items():
        if isinstance(target, tuple):
            key, (_, start, length) = target[0], target[1]
            if key in sd:  # the table names qkv biases too; Z-Image has none
                out[d] = sd[key][start:start + length]
        elif target in sd:
            out[d] = sd[target]
    return out


def test_key_set_is_comfyuis_and_detected(model):
    kind, patcher, sd, _, _ = model
    comfy_keys = {k[len("diffusion_model."):] for k in patcher.model.state_dict() if k.startswith("diffusion_model.")}
    assert set(sd) == comfy_keys
    assert import_comfy().model_detection.detect_unet_config(sd, "")["image_model"] == "lumina2"
    for prefix in ("", "model.diffusion_model."):
        info = detect_arch(as_source({prefix + k: v for k, v in sd.items()}))
        assert (info.arch, info.naming, info.prefix) == ("lumina2", "native", prefix)
        assert info.details["variant"] == ("Z-Image" if kind == "zimage" else "Lumina 2")
        assert info.details["attention"] == ("full" if kind == "zimage" else "grouped-query")
        assert (info.details["dim"], info.details["layers"]) == (32, 2) and "size" in info.details


def test_diffusers_named_zimage_detected():
    from diffusers import ZImageTransformer2DModel

    _, sd = dit_patcher("zimage")
    dsd = _native_to_diffusers(sd)
    ref = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                                   n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=[4, 6, 6],
                                   axes_lens=[64, 32, 32])
    assert set(dsd) <= set(ref.state_dict())  # ComfyUI's table names diffusers' own layers
    info = detect_arch(as_source(dsd))
    assert (info.arch, info.naming, info.details["variant"]) == ("lumina2", "diffusers", "Z-Image")


def test_inspect_names_it(tmp_path, capsys, model):
    kind, _, sd, _, _ = model
    out = inspect_checkpoint(tmp_path, capsys, sd)
    assert "full model" in out and "lumina2" in out and "size=" in out
    assert ("variant=Z-Image" if kind == "zimage" else "variant=Lumina 2") in out


def _loadable(kind, fmt, lora):
    """The part of `lora` a naming holds: kohya and lycoris name `.weight`s only; Lumina 2's grouped-query qkv has no
    split name ComfyUI cuts right; norm_final and Lumina 2's per-block adaLN_modulation.1 have no diffusers name."""
    def keep(n):
        if fmt in ("kohya", "lycoris") and n.endswith(("x_pad_token", "cap_pad_token")):
            return False
        if fmt in ("diffusers", "lycoris"):
            block_mod = re.search(r"\.\d+\.adaLN_modulation\.1$", n)
            if n.endswith("norm_final") or (kind == "lumina2" and (n.endswith(".qkv") or block_mod)):
                return False
        return True
    return only(lora, keep)


@pytest.mark.parametrize("fmt", ["comfy", "kohya", "diffusers", "lycoris"])
def test_extracted_lora_loads_in_comfy_and_patches_base_to_tuned(model, fmt):
    kind, patcher, sd, want, lora = model
    assert lora.arch == "lumina2"
    part = _loadable(kind, fmt, lora)
    if part.modules.keys() != lora.modules.keys():
        with pytest.raises(UnwritableError) as e:
            lora_state_dict(lora, fmt)
        assert set(e.value.modules) == set(lora.modules) - set(part.modules)
    lsd = lora_state_dict(part, fmt)
    if fmt == "diffusers":
        assert all(k.startswith("diffusion_model.") for k in lsd)
        if kind == "zimage":
            assert "diffusion_model.layers.0.attention.to_k.lora_A.weight" in lsd
    assert_comfy_patches_exactly(patcher, lsd, expected_weights(sd, want, part), fmt)
    assert_reads_back_exactly(part, lsd, fmt)


def test_grouped_query_qkv_refused_by_name_in_split_namings():
    _, sd = dit_patcher("lumina2")
    lora, _ = extract_lora(sd, tuned(sd), rank=2, dtype="fp32")
    with pytest.raises(UnwritableError, match="grouped-query qkv"):
        lora_state_dict(only(lora, lambda n: n.endswith(".qkv")), "diffusers")
    with pytest.raises(UnwritableError, match="no lora_transformer_ names"):
        lora_state_dict(lora, "onetrainer")


def test_diffusers_converter_reads_what_we_write_and_we_read_peft_names():
    """diffusers' `_convert_non_diffusers_z_image_lora_to_diffusers` (its reader of ai-toolkit and musubi files)
    takes our diffusers file to PEFT `transformer.*` names; those read back to the same changes."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    _, sd = dit_patcher("zimage")
    lora, _ = extract_lora(sd, tuned(sd), rank=4, dtype="fp32")
    part = only(lora, lambda n: n.endswith((".qkv", ".out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")))
    ours = lora_state_dict(part, "diffusers")
    peft = _convert_non_diffusers_z_image_lora_to_diffusers(dict(ours))
    assert "transformer.layers.0.attention.to_q.lora_A.weight" in peft
    back = load_lora(peft)
    assert back.arch == "lumina2" and not back.unknown_keys
    got, ref = deltas(lora_state_dict(back, "comfy")), deltas(lora_state_dict(part, "comfy"))
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)


def test_lumina_lora_refused_for_other_architectures(model):
    _, _, _, _, lora = model
    comfy = lora_state_dict(lora, "comfy")
    for other in ("flux", "flux2", "qwen-image", "wan", "sdxl"):
        with pytest.raises(MismatchError, match=arch_refusal("lumina2", other)):
            load_lora(comfy, arch=other)


def test_block_groups_address_lumina_blocks():
    from weightsmith.merge import parse_rule

    assert parse_rule("@blocks.1=take:B").matches("layers.1.attention.qkv.weight")
    assert not parse_rule("@blocks.1=take:B").matches("noise_refiner.1.attention.qkv.weight")
    assert parse_rule("@refiners=take:B").matches("noise_refiner.0.feed_forward.w1.weight")
    assert parse_rule("@refiners=take:B").matches("context_refiner.1.attention.out.weight")


def test_unknown_model_names_lumina2_as_closest():
    _, sd = dit_patcher("zimage")
    broken = {k: v for k, v in sd.items() if not k.startswith("cap_embedder.")}
    broken["layers.0.attention.mystery.weight"] = torch.zeros(2, 2)
    info = detect_arch(as_source(broken))
    assert info.arch == "unknown"
    assert "closest is lumina2" in info.reason and "layers.0.attention.mystery.weight" in info.reason
