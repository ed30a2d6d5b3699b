"""No silent loss (issue 19, items 1, 2 and 4 on the command line and in the core; the nodes are in
test_reliability_loss_nodes.py and test_reliability_loss_server.py).

- Every writable LoRA format × every architecture: a LoRA holding every kind of change (low-rank factors on
  every linear and conv, full diffs of 1-D weights, bias changes, a replacement, text-encoder layers) is
  written to a file and read back with the same modules and the same change, or refused with an error that
  names the modules the format cannot hold (and then the rest writes and reads back whole).
- merge: NaN/inf and all-zero weights are refused before any file is read; a merged or taken tensor holding
  NaN/Inf is never written, whatever `--nonfinite` says.
- extract --format F: refused, naming the modules F cannot hold and saying how to proceed (`--no-diff`, or
  the comfy format), with the message Save LoRA gives; nothing written.

CLI cases run a real `python -m weightsmith` process (the environment, PYTHONPATH included, is inherited).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_cases import assert_actionable, folder_state
from safetensors import safe_open

from weightsmith.errors import MismatchError
from weightsmith.lora import keymaps as km
from weightsmith.lora.formats import (
    LORA_ARCHES,
    WRITABLE_FORMATS,
    UnwritableError,
    load_lora,
    save_lora,
    unwritable_modules,
)
from weightsmith.lora.model import LoRA, LoraTerm, ModuleDelta
from weightsmith.lora.testloras import random_lora
from weightsmith.safetensors_io import write_safetensors
from weightsmith.sdunet import clip_text_shapes, sd_unet_shapes
from weightsmith.testmodels import FLUX_FULL, FluxConfig, finetune, flux_shapes, flux_state_dict

# ------------------------------------------------------------------------------ LoRAs with every kind of change

FLUX_VARIANT = {"flux": "dev", "chroma": "chroma"}
TEXT_ENCODERS = {"flux": ("clip_l", "t5xxl"), "chroma": ("t5xxl",), "sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g")}


def model_shapes(arch: str, size: str) -> dict[str, tuple[int, ...]]:
    if arch in FLUX_VARIANT:
        return flux_shapes(FLUX_FULL if size == "full" else FluxConfig(), FLUX_VARIANT[arch])
    return sd_unet_shapes(arch, size)


def te_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Canonical text-encoder module -> weight shape, for the encoders `arch` has."""
    out = {}
    for enc in TEXT_ENCODERS[arch]:
        if enc == "t5xxl":
            for proj in ("q", "k", "v", "o"):
                out[km.te_name("t5xxl", f"encoder.block.0.layer.0.SelfAttention.{proj}")] = (32, 32)
            continue
        for key, shape in clip_text_shapes(enc, layers=1).items():
            hf = key[len(f"{enc}.transformer."):]
            if key.endswith(".weight") and len(shape) == 2 and km.CLIP_LAYER_RE.match(hf[: -len(".weight")]):
                out[km.te_name(enc, hf[: -len(".weight")])] = shape
    return out


def every_change_lora(arch: str, size: str, rank: int = 2) -> tuple[LoRA, dict[str, tuple[int, ...]]]:
    """(a LoRA with every kind of change for `arch`, canonical module -> weight shape)."""
    shapes = model_shapes(arch, size)
    lora = random_lora(shapes, arch, rank=rank, seed=19, with_bias=True)  # every linear and conv, with its bias
    g = torch.Generator().manual_seed(23)
    weight_shapes = {}
    for key, shape in shapes.items():
        module = km.module_of_key(key)
        if module is None:
            continue
        weight_shapes[module] = shape
        if len(shape) == 1:  # norm gains, group-norm weights: a full diff, as extraction's store_diff makes
            lora.module(module).diff = torch.randn(shape, generator=g) * 0.01
    # a full diff beside factors on one weight, and a replacement of one 1-D weight (BFL control norms)
    first = "img_in" if arch in FLUX_VARIANT else "input_blocks.0.0"
    lora.modules[km.DIFFUSION + first].diff = torch.randn(shapes[first + ".weight"], generator=g) * 0.01
    replaced = next(k for k, s in sorted(shapes.items()) if len(s) == 1 and not k.endswith(".bias"))
    mod = lora.modules[km.module_of_key(replaced)]
    mod.diff, mod.set_weight = None, torch.randn(shapes[replaced], generator=g)
    for module, shape in te_shapes(arch).items():
        weight_shapes[module] = shape
        lora.modules[module] = ModuleDelta(terms=[LoraTerm(up=torch.randn(shape[0], rank, generator=g) * 0.02,
                                                           down=torch.randn(rank, shape[1], generator=g) * 0.02,
                                                           alpha=rank / 2)])
    return lora, weight_shapes


def _split_bias(module: str) -> bool:
    """Flux weights the diffusers names split (q/k/v, q/k/v/mlp) or swap (adaLN halves)."""
    return module.endswith(("_attn.qkv", ".linear1", "final_layer.adaLN_modulation.1"))


def expected_refusals(fmt: str, lora: LoRA) -> set[str]:
    """What each format cannot hold, from what the formats are (not from our writers): kohya has no key for
    Flux's norm `.scale` parameters (ComfyUI maps `.weight` only); diffusers and OneTrainer split fused Flux
    weights (no name for a bias change there) and name neither Chroma's guidance layer nor, for diffusers, T5;
    SimpleTuner's LyCORIS naming splits them as OneTrainer does."""
    out = set()
    for name, mod in lora.modules.items():
        bfl = name[len(km.DIFFUSION):] if name.startswith(km.DIFFUSION) else ""
        if lora.arch in ("sd15", "sdxl") or fmt == "comfy":
            continue
        if fmt == "kohya" and name.endswith(".scale"):
            out.add(name)
        if fmt in ("diffusers", "onetrainer", "lycoris") and bfl and (
                km.is_chroma_only(bfl) or (_split_bias(name) and mod.diff_b is not None)):
            out.add(name)
        if fmt == "diffusers" and name.startswith(km.TEXT + "t5xxl."):
            out.add(name)
    return out


def dense(mod: ModuleDelta, shape: tuple[int, ...]) -> torch.Tensor:
    return mod.dense_delta(shape, torch.float64)


def assert_same_change(want: LoRA, got: LoRA, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    assert set(got.modules) == set(want.modules), (where, sorted(set(want.modules) ^ set(got.modules))[:6])
    for name, w in want.modules.items():
        g = got.modules[name]
        shape = shapes[name]
        d_want, d_got = dense(w, shape), dense(g, shape)
        assert float((d_got - d_want).norm()) <= 1e-6 * float(d_want.norm()), (where, name)
        for role in ("diff_b", "set_weight"):
            a, b = getattr(w, role), getattr(g, role)
            assert (a is None) == (b is None), (where, name, role)
            if a is not None:
                assert torch.equal(a, b), (where, name, role)


def without(lora: LoRA, names: set[str]) -> LoRA:
    return LoRA({n: m for n, m in lora.modules.items() if n not in names}, lora.arch, lora.source_format,
                dict(lora.metadata))


@pytest.mark.parametrize("arch", LORA_ARCHES)
@pytest.mark.parametrize("fmt", WRITABLE_FORMATS)
def test_every_writer_holds_every_module_or_refuses_naming_them(fmt, arch, tmp_path):
    """Must show (issue 19): for every (writer format, architecture): modules written == modules read, with the
    same change, or a refusal naming the modules (nothing written), after which the rest writes whole."""
    lora, shapes = every_change_lora(arch, "small" if arch in ("sd15", "sdxl") else "tiny")
    refused = expected_refusals(fmt, lora)
    path = tmp_path / f"{fmt}.safetensors"
    if refused:
        with pytest.raises(UnwritableError) as e:
            save_lora(lora, path, fmt=fmt)
        assert set(e.value.modules) == refused
        message = str(e.value)
        assert f"cannot hold {len(refused)} module(s)" in message
        assert all(n in message for n in sorted(refused)[:8]), message
        assert_actionable(message)
        assert list(tmp_path.iterdir()) == []
        assert unwritable_modules(lora, fmt) == e.value.modules  # the same answer without touching a tensor
        lora = without(lora, refused)  # the explicit drop: everything else must still come back
    save_lora(lora, path, fmt=fmt)
    back = load_lora(path)
    assert (back.arch, back.source_format) == (arch, fmt)
    assert back.unknown_keys == []
    assert_same_change(lora, back, shapes, f"{fmt}/{arch}")


@pytest.mark.parametrize("arch", LORA_ARCHES)
@pytest.mark.parametrize("fmt", WRITABLE_FORMATS)
def test_full_size_layouts_read_back_every_module(fmt, arch, tmp_path):
    """The real layouts (19+38 Flux blocks, SD1.5 and SDXL UNets with their real block structure): the names
    alone decide, so a rank-1 LoRA on every layer must read back module for module (or be refused by name)."""
    lora, _ = every_change_lora(arch, "full", rank=1)
    refused = expected_refusals(fmt, lora)
    assert set(unwritable_modules(lora, fmt)) == refused
    lora = without(lora, refused)
    path = tmp_path / "full.safetensors"
    save_lora(lora, path, fmt=fmt)
    back = load_lora(path)
    assert set(back.modules) == set(lora.modules) and back.unknown_keys == []
    assert back.source_format == fmt
    for name, mod in lora.modules.items():
        got = back.modules[name]
        assert (got.diff is None, got.diff_b is None, got.set_weight is None) == (
            mod.diff is None, mod.diff_b is None, mod.set_weight is None), name


def test_names_that_would_not_read_back_are_refused(tmp_path):
    """save_lora reads its own names back before writing. A Flux LoRA (read from a comfy file) with a layer
    outside the Flux layout: kohya's underscored name for it reads back as nothing, so it is refused by name
    instead of being written where no loader finds it; the comfy format keeps it."""
    lora, _ = every_change_lora("flux", "tiny")
    lora.modules[km.DIFFUSION + "custom_blocks.0.proj"] = ModuleDelta(
        terms=[LoraTerm(up=torch.ones(8, 1), down=torch.ones(1, 8), alpha=1.0)])
    lora = without(lora, expected_refusals("kohya", lora))
    with pytest.raises(MismatchError) as e:
        save_lora(lora, tmp_path / "x.safetensors", fmt="kohya")
    assert "diffusion_model.custom_blocks.0.proj" in str(e.value) and "comfy" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    save_lora(lora, tmp_path / "x.safetensors", fmt="comfy")
    assert set(load_lora(tmp_path / "x.safetensors").modules) == set(lora.modules)


# ------------------------------------------------------------------------------------------- the CLI


def cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weightsmith", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def refused(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    """A tiny Flux dev base, a fine-tune of it (every tensor changed, 1-D ones too), and the base with one NaN."""
    d = tmp_path_factory.mktemp("loss_cli")
    base = flux_state_dict(FluxConfig(), "dev", seed=0)
    tuned = finetune(base, seed=1, rank=4, scale=0.05, noise=0.02)
    nan = {k: v.clone() for k, v in base.items()}
    nan["img_in.weight"][0, 0] = float("nan")
    paths = {}
    for name, sd in (("base", base), ("tuned", tuned), ("nan", nan)):
        paths[name] = d / f"{name}.safetensors"
        write_safetensors(paths[name], {k: v.to(torch.bfloat16) for k, v in sd.items()})
    return paths


@pytest.mark.parametrize("weights,why", [
    ("0,-0", "every weight is 0"), ("nan,1", "nan is not a finite number"), ("-inf,0.5", "-inf is not a finite number")])
def test_merge_refuses_non_finite_and_all_zero_weights(flux_files, tmp_path, weights, why):
    """Item 2: `--weights 0,0` wrote an all-zero model and `nan,1` a NaN one (a WARNING line in the report).
    Refused before any file is read, for every method and in rules too; nothing written."""
    before = folder_state(tmp_path)
    for extra in ([], ["--method", "ties"]):
        err = refused(cli("merge", flux_files["base"], flux_files["tuned"], f"--weights={weights}", *extra,
                          "-o", tmp_path / "m.safetensors", "--report", tmp_path / "m.json"))
        assert why in err and "weights" in err and "e.g." in err, err
    err = refused(cli("merge", flux_files["base"], flux_files["tuned"], "--rule", f"@double=weight:{weights}",
                      "-o", tmp_path / "m.safetensors"))
    # a rule's weights must be numbers of the form 0.7 (so nan/inf never parse as a weight action)
    assert "@double" in err and (why in err or ("nf" in weights or "nan" in weights)), err
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("policy", [[], ["--nonfinite", "error"]], ids=["default", "strict"])
def test_merge_never_writes_nan_or_inf_whatever_the_input_policy(flux_files, tmp_path, policy):
    """Item 2: the output-side check fails the run when an output tensor is not finite, merged or taken, with
    or without `--nonfinite error` (which used to check only the inputs): exit 2 naming key and file."""
    out = tmp_path / "m.safetensors"
    before = folder_state(tmp_path)
    err = refused(cli(*policy, "merge", flux_files["base"], flux_files["nan"], "-o", out, "--report", tmp_path / "r.json"))
    assert_actionable(err, "img_in.weight", flux_files["nan"].name)
    assert "take:A" in err
    err = refused(cli(*policy, "merge", flux_files["base"], flux_files["nan"], "--rule", r"^img_in\.weight$=take:B",
                      "-o", out))
    assert_actionable(err, "img_in.weight", flux_files["nan"].name)
    assert folder_state(tmp_path) == before
    # NaN from finite inputs (a parameter the method turns into NaN) is refused too
    err = refused(cli(*policy, "merge", flux_files["base"], flux_files["tuned"], flux_files["base"], "--method",
                      "add_difference", "--param", "alpha=nan", "-o", out))
    assert "made NaN from finite inputs" in err, err
    assert folder_state(tmp_path) == before
    if not policy:  # a dry run writes nothing, so it reports the keys instead of stopping at the first
        r = cli("merge", flux_files["base"], flux_files["nan"], "--dry-run")
        assert r.returncode == 0 and "img_in.weight" in r.stdout and "NaN/Inf" in r.stdout, r.stdout[-2000:]


def test_cli_extract_refuses_what_the_format_cannot_hold_like_save_lora(flux_files, tmp_path):
    """Item 4: `extract --format kohya` silently wrote a LoRA without the 6 norm changes it cannot name, while
    Save LoRA refused them. Now both refuse with one message saying how to proceed; nothing is written (the
    report and chart neither); `--no-diff` (the explicit choice) writes a file that reads back whole."""
    out, rep, png = tmp_path / "l.safetensors", tmp_path / "r.json", tmp_path / "c.png"
    for fmt, what in (("kohya", "query_norm.scale (no kohya name)"), ("diffusers", "img_attn.qkv (a bias change"),
                      ("onetrainer", "single_blocks.0.linear1 (a bias change")):
        err = refused(cli("extract", flux_files["base"], flux_files["tuned"], "-o", out, "--rank", "4", "--format",
                          fmt, "--report", rep, "--chart", png))
        assert f"the {fmt} format cannot hold" in err and what in err, err
        assert "--no-diff" in err and "store_diff" in err and "comfy" in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == []
        r = cli("extract", flux_files["base"], flux_files["tuned"], "-o", out, "--rank", "4", "--format", fmt,
                "--no-diff")
        assert r.returncode == 0, r.stderr[-2000:]
        lora = load_lora(out)
        assert lora.source_format == fmt and all(m.terms for m in lora.modules.values())
        assert f"({fmt}, {len(lora.modules)} modules)" in r.stdout
        out.unlink()
    r = cli("extract", flux_files["base"], flux_files["tuned"], "-o", out, "--rank", "4")  # comfy holds all
    assert r.returncode == 0, r.stderr[-2000:]
    assert any(n.endswith(".scale") for n in load_lora(out).modules)


@pytest.fixture(scope="module")
def sd15_lora(tmp_path_factory) -> Path:
    """The demo SD1.5 LoRA's layout: 51 modules on the tiny UNet, 24 of them `output_blocks.*.1` attention."""
    path = tmp_path_factory.mktemp("loss_sd15") / "sd15-kohya-r4.safetensors"
    save_lora(random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=4, seed=103), path, fmt="kohya")
    return path


@pytest.mark.parametrize("fmt", WRITABLE_FORMATS)
def test_cli_convert_writes_the_format_it_names_with_every_module(sd15_lora, tmp_path, fmt):
    """Item 1 on the command line: every module comes back from the converted file, and the file reads as the
    format it was written in (OneTrainer's SD names are kohya's: the recorded format tells them apart)."""
    src = load_lora(sd15_lora)
    assert len(src.modules) == 51
    out = tmp_path / f"{fmt}.safetensors"
    r = cli("convert", sd15_lora, "--to", fmt, "-o", out, "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    back = load_lora(out)
    assert (back.source_format, back.arch, set(back.modules)) == (fmt, "sd15", set(src.modules))
    assert f"({fmt}, sd15, 51 modules)" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["applied"] == 51
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["weightsmith.format"] == fmt
