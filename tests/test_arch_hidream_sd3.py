"""HiDream and SD3.5 as first-class architectures: tiny models built from `comfy.supported_models.HiDream` / `SD3`,
detected with and without a checkpoint prefix, inspected, and LoRAs extracted in every naming ComfyUI 0.3.75 loads for
them, loaded and applied by real ComfyUI; what a naming cannot hold is refused by module name."""

from __future__ import annotations

import copy

import pytest
import torch
from arch_support import (
    arch_refusal,
    assert_comfy_patches_exactly,
    assert_reads_back_exactly,
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

ARCH = {"hidream": "hidream", "sd3": "sd3"}
NAMINGS = {"hidream": ("comfy", "kohya", "diffusers", "lycoris"),
           "sd3": ("comfy", "kohya", "diffusers", "lycoris", "onetrainer")}
REFUSED = {"hidream": ("onetrainer",), "sd3": ()}


@pytest.fixture(scope="module", params=["hidream", "sd3"])
def model(request):
    patcher, sd = dit_patcher(request.param)
    want = tuned(sd)
    lora, _ = extract_lora(sd, want, rank=4, dtype="fp32")
    return request.param, patcher, sd, want, lora


@pytest.fixture(scope="module")
def sd3():
    patcher, sd = dit_patcher("sd3")
    want = tuned(sd)
    lora, _ = extract_lora(sd, want, rank=4, dtype="fp32")
    return "sd3", patcher, sd, want, lora


def _splits(kind: str, name: str) -> bool:
    """Modules an SD3 diffusers-style name cuts (q/k/v thirds) or swaps (final and pre-only context modulations)."""
    return kind == "sd3" and (name.endswith(".qkv") or name.endswith("final_layer.adaLN_modulation.1")
                              or name.endswith("joint_blocks.1.context_block.adaLN_modulation.1"))


def _holdable(kind, fmt, lora):
    """The part of `lora` a naming holds: kohya / diffusers-style names address `.weight`s (not SD3's pos_embed); SD3's
    split or swapped weights take no bias change in diffusers-style names (ComfyUI loads the slices as functions)."""
    if fmt == "comfy":
        return lora
    part = only(lora, lambda n: not n.endswith("pos_embed"))
    if fmt != "kohya":
        part.modules = {n: (copy.copy(m) if _splits(kind, n) else m) for n, m in part.modules.items()}
        for n, m in part.modules.items():
            if _splits(kind, n):
                m.diff_b = None
    return part


def test_key_set_is_comfyuis_and_detected_with_and_without_prefix(model):
    kind, patcher, sd, _, _ = model
    comfy_keys = {k[len("diffusion_model."):] for k in patcher.model.state_dict() if k.startswith("diffusion_model.")}
    assert set(sd) == comfy_keys
    detected = import_comfy().model_detection.detect_unet_config(sd, "")
    assert detected.get("image_model", "mmdit") == ("hidream" if kind == "hidream" else "mmdit")
    for prefix in ("", "model.diffusion_model."):
        info = detect_arch(as_source({prefix + k: v for k, v in sd.items()}))
        assert (info.arch, info.prefix) == (ARCH[kind], prefix) and "size" in info.details
        if kind == "sd3":
            assert info.details["variant"] == "SD3.5 Medium" and info.details["depth"] == 2
        else:
            assert (info.details["double_blocks"], info.details["single_blocks"], info.details["experts"]) == (2, 2, 2)


def test_diffusers_named_sd3_detected(sd3):
    _, _, sd, _, _ = sd3  # (HiDream's diffusers names are ComfyUI's: the test above covers them)
    import comfy.utils

    table = comfy.utils.mmdit_to_diffusers({"depth": 2}, output_prefix="")
    dsd = {}
    for d, target in table.items():
        key, rows = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
        if key in sd:
            dsd[d] = sd[key] if rows is None else sd[key][rows[1]:rows[1] + rows[2]]
    info = detect_arch(as_source({"transformer." + k: v for k, v in dsd.items()}))
    assert (info.arch, info.naming, info.details["variant"]) == ("sd3", "diffusers", "SD3.5 Medium")


def test_inspect_names_it(tmp_path, capsys, model):
    kind, _, sd, _, _ = model
    out = inspect_checkpoint(tmp_path, capsys, sd)
    assert "full model" in out and ARCH[kind] in out and "variant=" in out and "size=" in out


@pytest.mark.parametrize("fmt", ["comfy", "kohya", "diffusers", "lycoris", "onetrainer"])
def test_extracted_lora_in_every_naming_loads_in_comfy_and_patches_base_to_tuned(model, fmt):
    kind, patcher, sd, want, lora = model
    assert lora.arch == ARCH[kind]
    if fmt in REFUSED[kind]:
        with pytest.raises(UnwritableError, match="format cannot hold"):
            lora_state_dict(lora, fmt)
        return
    part = _holdable(kind, fmt, lora)
    if part.modules.keys() != lora.modules.keys() or any(part.modules[n] is not lora.modules[n] for n in part.modules):
        with pytest.raises(UnwritableError) as e:
            lora_state_dict(lora, fmt)
        assert set(e.value.modules) == {n for n in lora.modules if n not in part.modules or part.modules[n] is not
                                        lora.modules[n]}
    lsd = lora_state_dict(part, fmt)
    if fmt == "diffusers":
        assert all(k.startswith("transformer.") for k in lsd)
        if kind == "sd3":
            assert "transformer.transformer_blocks.0.attn2.to_k.lora_A.weight" in lsd
            assert "transformer.transformer_blocks.1.norm1_context.linear.lora_B.weight" in lsd
    assert_comfy_patches_exactly(patcher, lsd, expected_weights(sd, want, part), fmt)
    assert_reads_back_exactly(part, lsd, fmt)


def test_lora_refused_for_other_architectures(model):
    kind, _, _, _, lora = model
    comfy = lora_state_dict(lora, "comfy")
    for other in ("flux", "flux2", "qwen-image", "wan", "lumina2", "sdxl", "hidream" if kind == "sd3" else "sd3"):
        with pytest.raises(MismatchError, match=arch_refusal(ARCH[kind], other)):
            load_lora(comfy, arch=other)


def test_sd3_attention_lora_in_diffusers_names_is_not_read_as_flux_or_qwen(sd3):
    """SD3's diffusers attention names are Flux's and Qwen-Image's too: the widths (64 per block) decide."""
    kind, _, _, _, lora = sd3
    attn = only(_holdable(kind, "diffusers", lora), lambda n: n.endswith("x_block.attn.qkv"))
    lsd = {k: v for k, v in lora_state_dict(attn, "diffusers").items()}
    back = load_lora(lsd)
    assert back.arch == "sd3" and set(back.modules) == set(attn.modules)
    torch.testing.assert_close(back.modules[next(iter(attn.modules))].terms[0].down,
                               attn.modules[next(iter(attn.modules))].terms[0].down)


def test_block_groups_address_hidream_and_sd3():
    from weightsmith.merge import parse_rule

    assert parse_rule("@double.1=take:B").matches("double_stream_blocks.1.block.attn1.to_q.weight")
    assert parse_rule("@single=take:B").matches("single_stream_blocks.0.block.ff_i.gate.weight")
    assert parse_rule("@experts=take:B").matches("double_stream_blocks.0.block.ff_i.experts.1.w2.weight")
    assert parse_rule("@blocks.1=take:B").matches("joint_blocks.1.x_block.mlp.fc1.weight")
    assert parse_rule("@img=take:B").matches("joint_blocks.0.x_block.attn.qkv.weight")
    assert parse_rule("@txt=take:B").matches("joint_blocks.0.context_block.attn.qkv.weight")
    assert parse_rule("@img=take:B").matches("double_stream_blocks.0.block.attn1.to_q.weight")
    assert parse_rule("@txt=take:B").matches("double_stream_blocks.0.block.attn1.to_q_t.weight")
