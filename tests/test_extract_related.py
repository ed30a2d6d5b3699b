"""Extraction between related bases: Flux dev vs schnell pair over their shared keys and list the guidance
embedder; models of different architectures are still refused; `--missing error` refuses any difference."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from weightsmith.cli import main
from weightsmith.errors import MismatchError
from weightsmith.lora.extract import extract_lora
from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict, random_state_dict

GUIDANCE = ["guidance_in.in_layer.bias", "guidance_in.in_layer.weight", "guidance_in.out_layer.bias",
            "guidance_in.out_layer.weight"]


@pytest.fixture(scope="module")
def dev_schnell():
    dev = flux_state_dict(FluxConfig(), "dev", seed=0)
    schnell = finetune({k: v for k, v in dev.items() if not k.startswith("guidance_in.")}, seed=3)
    return dev, schnell


def test_dev_vs_schnell_extracts_over_shared_keys_and_lists_guidance(dev_schnell):
    dev, schnell = dev_schnell
    lora, report = extract_lora(dev, schnell, rank=4, dtype="fp32")
    assert report.unpaired == {"base": GUIDANCE}
    assert not any("guidance_in" in n for n in lora.modules) and lora.modules
    assert "4 tensors only in the base model, not compared: " + ", ".join(GUIDANCE) in report.text()
    with pytest.raises(MismatchError, match="4 tensors only in the base"):
        extract_lora(dev, schnell, rank=4, missing="error")


def test_cli_missing_skip_and_error(tmp_path, capsys, dev_schnell):
    dev, schnell = dev_schnell
    a, b = tmp_path / "dev.safetensors", tmp_path / "schnell.safetensors"
    save_file(dev, str(a))
    save_file(schnell, str(b))
    out = tmp_path / "lora.safetensors"
    assert main(["extract", str(a), str(b), "-o", str(out), "--rank", "4", "--missing", "skip"]) == 0
    assert "guidance_in.in_layer.weight" in capsys.readouterr().out and out.exists()
    assert main(["validate", str(a), str(b), str(out), "--missing", "skip"]) == 0
    assert main(["extract", str(a), str(b), "-o", str(tmp_path / "x.safetensors"), "--missing", "error"]) == 2
    assert "pass --missing skip" in capsys.readouterr().err


def test_unrelated_architectures_still_refused_by_default(dev_schnell):
    dev, _ = dev_schnell
    other = random_state_dict({"input_blocks.0.0.weight": (8, 4, 3, 3), "out.2.weight": (4, 8, 3, 3)})
    shared = {**other, "img_in.weight": dev["img_in.weight"]}
    with pytest.raises(MismatchError, match="not the same architecture"):
        extract_lora(dev, shared, rank=4)
