"""One "same architecture?" table for every up-front check (mix, bake, validate, LoRA loading): Flux dev/schnell
and Chroma are one family, SD UNets another, each newer architecture its own — Flux.2 is not Flux although its
name starts with "flux"."""

from __future__ import annotations

import pytest

from weightsmith.arch import arch_family
from weightsmith.errors import MismatchError
from weightsmith.lora.model import LoRA
from weightsmith.lora.validate import _as_lora
from weightsmith.mix import check_same_architecture


@pytest.mark.parametrize(("arch", "family"), [
    ("flux", "flux"), ("flux-dev", "flux"), ("flux-schnell", "flux"), ("chroma", "flux"), ("sdxl", "sd"),
    ("sd15", "sd"), ("flux2", "flux2"), ("qwen-image", "qwen-image"), ("wan", "wan"), ("lumina2", "lumina2"),
    ("hidream", "hidream"), ("sd3", "sd3"), ("something-else", "unknown"),
])
def test_every_architecture_has_one_family(arch: str, family: str) -> None:
    assert arch_family(arch) == family


def test_mix_refuses_flux2_with_flux_and_names_both() -> None:
    with pytest.raises(MismatchError) as e:
        check_same_architecture([("a dev.safetensors", "flux-dev"), ("b f2.safetensors", "flux2")])
    assert "flux-dev" in str(e.value) and "flux2" in str(e.value)
    check_same_architecture([("a dev", "flux-dev"), ("b schnell", "flux-schnell"), ("c chroma", "chroma")])


@pytest.mark.parametrize(("lora_arch", "model_arch"), [("wan", "hidream"), ("flux2", "flux"), ("sd3", "qwen-image")])
def test_validate_refuses_a_loaded_lora_of_another_new_architecture(lora_arch: str, model_arch: str) -> None:
    with pytest.raises(MismatchError) as e:
        _as_lora(LoRA(arch=lora_arch), model_arch)
    assert lora_arch in str(e.value) and model_arch in str(e.value)
    assert _as_lora(LoRA(arch=model_arch), model_arch).arch == model_arch
