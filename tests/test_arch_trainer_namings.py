"""The namings Qwen-Image and Wan trainers write beyond ComfyUI's and kohya's: DiffSynth-Studio's PEFT files on the
models' own names (bare, or under `pipe.dit.`), musubi-tuner's kohya names for Wan (read by diffusers' own musubi
converter), and VideoX-Fun's `lora_unet__` Wan names; each read exactly and loaded by real ComfyUI."""

from __future__ import annotations

import re

import pytest
import torch
from arch_support import assert_comfy_patches_exactly, deltas, expected_weights, only, tuned
from comfy_support import apply_lora, dit_patcher

from weightsmith.lora.extract import extract_lora
from weightsmith.lora.formats import detect_format, load_lora, lora_state_dict

pytestmark = pytest.mark.comfy

WAN_BLOCK_LINEARS = re.compile(r"\.blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])$")


@pytest.fixture(scope="module", params=["wan-t2v", "qwen"])
def model(request):
    patcher, sd = dit_patcher(request.param)
    want = tuned(sd)
    lora, _ = extract_lora(sd, want, rank=4, dtype="fp32", store_diff=False)
    return request.param, patcher, sd, want, lora


@pytest.fixture(scope="module")
def wan():
    patcher, sd = dit_patcher("wan-t2v")
    want = tuned(sd)
    lora, _ = extract_lora(sd, want, rank=4, dtype="fp32", store_diff=False)
    return "wan-t2v", patcher, sd, want, lora


def _peft(comfy_sd: dict[str, torch.Tensor], prefix: str, adapter: str = "") -> dict[str, torch.Tensor]:
    """A comfy-named LoRA as DiffSynth's trainer saves it: PEFT lora_A/lora_B (alpha folded into lora_B) on the
    model's own module names, under `prefix`; `adapter` is PEFT's adapter name (`default.`) when kept."""
    out = {}
    for k, up in comfy_sd.items():
        if k.endswith(".lora_up.weight"):
            m = k[: -len(".lora_up.weight")]
            down = comfy_sd[m + ".lora_down.weight"]
            alpha = comfy_sd.get(m + ".alpha")
            name = prefix + m[len("diffusion_model."):]
            out[f"{name}.lora_A.{adapter}weight"] = down
            out[f"{name}.lora_B.{adapter}weight"] = up * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
    return out


@pytest.mark.parametrize("prefix,adapter", [("", ""), ("", "default."), ("pipe.dit.", "")])
def test_diffsynth_files_read_exactly_and_load_in_comfy(model, prefix, adapter):
    kind, patcher, sd, want, lora = model
    comfy = lora_state_dict(lora, "comfy")
    file = _peft(comfy, prefix, adapter)
    arch = "qwen-image" if kind == "qwen" else "wan"
    back = load_lora(file, arch=arch)
    assert back.arch == arch and not back.unknown_keys
    assert detect_format(file) == ("diffsynth" if kind.startswith("wan") or prefix else "diffusers")
    got, ref = deltas(lora_state_dict(back, "comfy")), deltas(comfy)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    # converted to ComfyUI's naming, it patches base -> tuned in ComfyUI
    assert_comfy_patches_exactly(patcher, lora_state_dict(back, "comfy"), expected_weights(sd, want, back), "comfy")
    if prefix == "" and adapter == "":
        _, missing, _ = apply_lora(patcher, file)
        # ComfyUI 0.3.75 loads Qwen-Image's bare names as they are; bare Wan names only after conversion
        assert (missing == []) == (kind == "qwen")


def test_musubi_wan_lora_is_what_diffusers_musubi_converter_reads(wan):
    """musubi-tuner's Wan LoRAs are `lora_unet_blocks_N_{self,cross}_attn_{q,k,v,o}` / `ffn_{0,2}` with alphas: our
    kohya naming; diffusers' converter for musubi files takes ours whole and finds the same changes."""
    from diffusers.loaders.lora_conversion_utils import _convert_musubi_wan_lora_to_diffusers

    _, _, _, _, lora = wan  # musubi's Qwen-Image files carry kohya's names on Qwen-Image's modules: see test_arch_dits
    part = only(lora, lambda n: bool(WAN_BLOCK_LINEARS.search(n)))
    kohya = lora_state_dict(part, "kohya")
    converted = _convert_musubi_wan_lora_to_diffusers(dict(kohya))
    names = {"self_attn": "attn1", "cross_attn": "attn2"}
    proj = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
    ref = deltas(lora_state_dict(part, "comfy"))
    for module, delta in ref.items():
        m = re.search(r"blocks\.(\d+)\.(self_attn|cross_attn|ffn)\.(\w)$", module)
        block, layer, leaf = m.groups()
        d = (f"transformer.blocks.{block}.{names[layer]}.{proj[leaf]}" if layer != "ffn" else
             f"transformer.blocks.{block}.ffn.{'net.0.proj' if leaf == '0' else 'net.2'}")
        product = converted[d + ".lora_B.weight"].double() @ converted[d + ".lora_A.weight"].double()
        torch.testing.assert_close(product, delta, rtol=1e-5, atol=1e-7, msg=module)


def test_videox_fun_double_underscore_wan_names(wan):
    _, patcher, sd, want, lora = wan
    kohya = lora_state_dict(lora, "kohya")
    fun = {k.replace("lora_unet_", "lora_unet__", 1): v for k, v in kohya.items()}
    back = load_lora(fun)
    assert back.arch == "wan" and not back.unknown_keys and set(back.modules) == set(lora.modules)
    assert_comfy_patches_exactly(patcher, fun, expected_weights(sd, want, lora), "kohya (VideoX-Fun)")
