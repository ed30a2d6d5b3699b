"""The opt-in re-project Flux -> Chroma mode: per layer through both bases, delta-only methods, seeded,
strength applied once, re-extracted at a chosen rank; wrong bases refused; CLI."""

from __future__ import annotations

import json

import pytest
import torch

from weightsmith.cli import main
from weightsmith.errors import MismatchError
from weightsmith.lora import keymaps
from weightsmith.lora.convert import flux_to_chroma
from weightsmith.lora.formats import load_lora, save_lora
from weightsmith.lora.model import LoRA
from weightsmith.lora.reproject import ReprojectOptions, comparative_mask, reproject_flux_to_chroma
from weightsmith.lora.testloras import random_lora
from weightsmith.sources import DictSource
from weightsmith.testmodels import FluxConfig, flux_shapes, flux_state_dict

CFG = FluxConfig()
FLUX_SD = flux_state_dict(CFG, "dev", seed=1)


def chroma_from(flux_sd, seed=2):
    """A 'Chroma' sharing Flux's layers, some of them moved (as a Chroma fine-tune would)."""
    chroma = flux_state_dict(CFG, "chroma", seed=seed)
    g = torch.Generator().manual_seed(seed)
    for k in chroma:
        if k in flux_sd:
            chroma[k] = flux_sd[k] + 0.05 * torch.randn(flux_sd[k].shape, generator=g) * flux_sd[k].std()
    return chroma


CHROMA_SD = chroma_from(FLUX_SD)


class CountingSource(DictSource):
    def __init__(self, tensors, name):
        super().__init__(tensors, name=name)
        self.reads: list[str] = []

    def _load(self, key):
        self.reads.append(key)
        return super()._load(key)


def lora(rank=4):
    return random_lora(flux_shapes(CFG, "dev"), "flux", rank=rank, seed=3, scale=0.1)


def kept_delta(lo, name, strength=1.0):
    return lo.modules[name].dense_delta(tuple(CHROMA_SD[keymaps.weight_key(name)].shape)) * strength


def test_add_difference_reproduces_the_exact_conversion_and_reads_one_layer_at_a_time():
    src = lora()
    flux, chroma = CountingSource(FLUX_SD, "flux"), CountingSource(CHROMA_SD, "chroma")
    out, report = reproject_flux_to_chroma(src, flux, chroma, ReprojectOptions("add_difference", rank=8))
    exact, exact_report = flux_to_chroma(src)
    assert report.dropped == exact_report.dropped and set(out.modules) == set(exact.modules)
    for name in out.modules:
        want = kept_delta(src, name)
        got = out.modules[name].dense_delta(tuple(want.shape))
        assert float((got - want).norm()) <= 1e-4 * float(want.norm())
    # each base read once per kept layer, nothing else (no whole model in memory)
    assert sorted(flux.reads) == sorted(keymaps.weight_key(n) for n in out.modules) == sorted(chroma.reads)
    assert max(d["reextraction_error"] for d in report.details.values()) < 1e-4


def test_strength_is_applied_once():
    src = lora()
    one, _ = reproject_flux_to_chroma(src, FLUX_SD, CHROMA_SD, ReprojectOptions(rank=8, strength=1.0))
    half, _ = reproject_flux_to_chroma(src, FLUX_SD, CHROMA_SD, ReprojectOptions(rank=8, strength=0.5))
    for name in one.modules:
        shape = tuple(CHROMA_SD[keymaps.weight_key(name)].shape)
        a, b = one.modules[name].dense_delta(shape), half.modules[name].dense_delta(shape)
        assert float((b - 0.5 * a).norm()) <= 1e-4 * float(a.norm())


def test_comparative_masks_the_delta_only_and_is_seeded():
    src = lora()
    opts = ReprojectOptions("comparative", rank=64, alpha=0.5, gamma=0.0, seed=7)  # Bernoulli mask
    out, report = reproject_flux_to_chroma(src, FLUX_SD, CHROMA_SD, opts)
    again, _ = reproject_flux_to_chroma(src, FLUX_SD, CHROMA_SD, opts)
    other, _ = reproject_flux_to_chroma(src, FLUX_SD, CHROMA_SD, ReprojectOptions("comparative", rank=64, gamma=0.0, seed=8))
    name = "diffusion_model.double_blocks.0.img_attn.proj"
    key = keymaps.weight_key(name)
    shape = tuple(CHROMA_SD[key].shape)
    from weightsmith.lora.reproject import _generator

    mask = comparative_mask(FLUX_SD[key], CHROMA_SD[key], opts, _generator(7, key, torch.device("cpu")))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    want = kept_delta(src, name) * mask
    got = out.modules[name].dense_delta(shape)
    assert float((got - want).norm()) <= 1e-4 * float(want.norm())  # rank 64 ≥ the layer's: re-extraction exact
    assert torch.equal(got, again.modules[name].dense_delta(shape))
    assert not torch.equal(got, other.modules[name].dense_delta(shape))
    assert 0 < report.details[name]["method_change"] < 1
    ident, _ = reproject_flux_to_chroma(src, FLUX_SD, CHROMA_SD, ReprojectOptions("comparative", rank=8, alpha=1.0))
    torch.testing.assert_close(ident.modules[name].dense_delta(shape), kept_delta(src, name), rtol=1e-4, atol=1e-7)


def test_add_dissimilar_scales_rows_by_the_cosine_with_the_base_shift():
    src = lora()
    opts = ReprojectOptions("add_dissimilar", rank=64, beta=1.0, gamma=1.0, multiplier=2.0)
    out, _ = reproject_flux_to_chroma(src, FLUX_SD, CHROMA_SD, opts)
    name = "diffusion_model.single_blocks.0.linear2"
    key = keymaps.weight_key(name)
    delta = kept_delta(src, name)
    cos = torch.nn.functional.cosine_similarity(delta, CHROMA_SD[key] - FLUX_SD[key], dim=1)
    want = delta * (2.0 * (1 - (cos + 1) / 2))[:, None]
    got = out.modules[name].dense_delta(tuple(delta.shape))
    assert float((got - want).norm()) <= 1e-4 * float(want.norm())


def test_reextraction_to_a_lower_rank_and_wrong_bases():
    src = lora(rank=8)
    out, report = reproject_flux_to_chroma(src, FLUX_SD, CHROMA_SD, ReprojectOptions("comparative", rank=2, gamma=1.0))
    assert all(m.rank <= 2 for m in out.modules.values())
    assert max(d["reextraction_error"] for d in report.details.values()) > 0
    with pytest.raises(MismatchError, match="the Flux base must be"):
        reproject_flux_to_chroma(src, CHROMA_SD, FLUX_SD)
    with pytest.raises(MismatchError, match="needs a Flux LoRA"):
        reproject_flux_to_chroma(LoRA(arch="sd15"), FLUX_SD, CHROMA_SD)


def test_cli_reproject(tmp_path):
    from safetensors.torch import save_file

    flux, chroma = tmp_path / "flux.safetensors", tmp_path / "chroma.safetensors"
    save_file(FLUX_SD, flux)
    save_file(CHROMA_SD, chroma)
    src = save_lora(lora(), tmp_path / "l.safetensors", fmt="kohya")
    out, rep = tmp_path / "c.safetensors", tmp_path / "r.json"
    assert main(["convert", str(src), "-o", str(out), "--target-arch", "chroma", "--reproject", "comparative",
                 "--flux-base", str(flux), "--chroma-base", str(chroma), "--rank", "4", "--seed", "3",
                 "--report", str(rep)]) == 0
    back = load_lora(out)
    assert back.arch == "chroma" and back.metadata["weightsmith.reproject"] == "comparative"
    data = json.loads(rep.read_text())
    assert data["dropped"] == 10 and "module_details" in data
    assert main(["convert", str(src), "-o", str(tmp_path / "x.safetensors"), "--reproject", "comparative"]) == 2
