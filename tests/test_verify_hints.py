"""`weightsmith verify` gives the hint that fits why keys would not load (issue #21 item 2): a LoRA of
another architecture and layers of other sizes get no "convert" advice (no conversion helps); keys a
conversion maps onto the model get it only when the converted LoRA, checked by ComfyUI's own loader,
then loads fully."""

from __future__ import annotations

import pytest

from weightsmith.cli import main
from weightsmith.lora.formats import save_lora
from weightsmith.lora.testloras import flux_block_linears, random_lora
from weightsmith.sdunet import sd_unet_shapes
from weightsmith.testmodels import FluxConfig, flux_shapes, write_model

pytestmark = pytest.mark.comfy

CFG = FluxConfig()
CONVERT_HINT = "writes a file ComfyUI loads fully"


@pytest.fixture(scope="module")
def files(tmp_path_factory, comfy):
    d = tmp_path_factory.mktemp("verify")
    paths = {}
    for name, shapes in (("dev", flux_shapes(CFG, "dev")), ("schnell", flux_shapes(CFG, "schnell")),
                         ("chroma", flux_shapes(CFG, "chroma")),
                         ("wide", flux_shapes(FluxConfig(hidden=128), "dev"))):
        paths[name] = d / f"{name}.safetensors"
        write_model(paths[name], shapes, seed=0)
    dev_shapes = flux_shapes(CFG, "dev")
    paths["flux_lora"] = save_lora(random_lora(dev_shapes, "flux", rank=4, seed=1), d / "flux.safetensors", fmt="kohya")
    paths["blocks_lora"] = save_lora(random_lora(dev_shapes, "flux", rank=4, seed=2, targets=flux_block_linears),
                                     d / "blocks.safetensors", fmt="kohya")
    paths["sd15_lora"] = save_lora(random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=4, seed=3),
                                   d / "sd15.safetensors", fmt="kohya")
    return paths


def _verify(capsys, *argv) -> tuple[int, list[str]]:
    rc = main(["verify", *map(str, argv)])
    return rc, [line for line in capsys.readouterr().out.splitlines() if line.startswith("hint: ")]


def test_wrong_architecture_says_so_and_offers_no_conversion(files, capsys):
    rc, hints = _verify(capsys, files["sd15_lora"], "--arch", "flux", "--model", files["dev"])
    assert rc == 1 and len(hints) == 1
    assert "is an SD1.5 LoRA, not a Flux one" in hints[0] and "no conversion changes that" in hints[0]
    assert "--arch sd15" in hints[0] and CONVERT_HINT not in hints[0]


def test_other_sizes_offer_no_conversion(files, capsys):
    rc, hints = _verify(capsys, files["blocks_lora"], "--arch", "flux", "--model", files["wide"])
    assert rc == 1 and hints
    assert "other sizes" in hints[0] and "a conversion keeps every size" in hints[0]
    assert not any(CONVERT_HINT in h for h in hints)


def test_layers_the_variant_lacks_offer_no_conversion(files, capsys):
    """A Flux dev LoRA with guidance-embedder modules on a schnell model: those layers are not there in any format."""
    rc, hints = _verify(capsys, files["flux_lora"], "--arch", "flux", "--model", files["schnell"])
    assert rc == 1 and len(hints) == 1
    assert "no conversion makes them load" in hints[0] and CONVERT_HINT not in hints[0]


def test_conversion_offered_only_when_it_loads_fully(files, capsys, tmp_path):
    rc, hints = _verify(capsys, files["flux_lora"], "--arch", "chroma", "--model", files["chroma"])
    assert rc == 1 and len(hints) == 1
    assert "--target-arch chroma" in hints[0] and CONVERT_HINT in hints[0] and "modulation layers" in hints[0]
    fixed = tmp_path / "fixed.safetensors"
    assert main(["convert", str(files["flux_lora"]), "-o", str(fixed), "--to", "comfy", "--target-arch", "chroma"]) == 0
    capsys.readouterr()
    assert _verify(capsys, fixed, "--arch", "chroma", "--model", files["chroma"]) == (0, [])  # the advice holds
