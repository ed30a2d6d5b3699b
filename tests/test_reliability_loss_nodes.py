"""No silent loss in the nodes (issue 19, items 1–4), in-process in the real ComfyUI: the node classes are
called as ComfyUI calls them, on real ModelPatchers; the API-level twins are in test_reliability_loss_server.py.

1. Load LoRA → Convert LoRA (diffusers / onetrainer / kohya) → Save LoRA writes every module, in the format it
   names, and Convert's count is Save's count (the demo SD1.5 LoRA lost its 24 `output_blocks.*.1` modules).
2. Merge Model Files / Merge Models refuse NaN/inf and all-zero weights; a merged NaN is never written.
3. Apply LoRA refuses a LoRA made for another width, naming modules and both shapes, before ComfyUI would
   log shape errors and patch nothing.
4. Extract LoRA (store_diff on) → Save LoRA kohya/diffusers/onetrainer refuses with the CLI's message, which
   says how to proceed (store_diff off, or the comfy format).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfy_support import LogCapture, flux_patcher, import_pack, unet_patcher
from comfy_support import call_node as call
from reliability_cases import assert_actionable, folder_state
from safetensors import safe_open
from safetensors.torch import save_file

from weightsmith.lora.formats import load_lora as ws_load_lora
from weightsmith.lora.formats import save_lora
from weightsmith.lora.testloras import flux_block_linears, random_lora
from weightsmith.sdunet import sd_unet_shapes, sd_unet_state_dict
from weightsmith.testmodels import FluxConfig, finetune, flux_shapes, flux_state_dict

pytestmark = pytest.mark.comfy

SD15_LORA, FLUX_LORA = "sd15-kohya-r4.safetensors", "flux-kohya-r8.safetensors"


@pytest.fixture(scope="module")
def nodes(comfy):
    return import_pack().NODE_CLASS_MAPPINGS


def pack(module: str):
    """A module of the pack's own core (ComfyUI imports it as `<pack>.core`, a copy distinct from `weightsmith`)."""
    return importlib.import_module(f"{import_pack().__name__}.core.{module}")




@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> Path:
    """Made once: the demo LoRAs' layouts (SD1.5 tiny UNet, 51 modules; Flux block linears), a tiny Flux dev
    base, a fine-tune of it (1-D weights changed too) and the base with one NaN."""
    d = tmp_path_factory.mktemp("loss_nodes")
    save_lora(random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=4, seed=103), d / SD15_LORA, fmt="kohya")
    save_lora(random_lora(flux_shapes(FluxConfig(), "dev"), "flux", rank=8, seed=101, targets=flux_block_linears),
              d / FLUX_LORA, fmt="kohya")
    base = flux_state_dict(FluxConfig(), "dev", seed=1)
    nan = {k: v.clone() for k, v in base.items()}
    nan["img_in.weight"][0, 0] = float("nan")
    for name, sd in (("a", base), ("b", finetune(base, seed=2, rank=4, scale=0.05, noise=0.02)), ("nan", nan)):
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(d / f"{name}.safetensors"))
    return d


@pytest.fixture
def folders(tmp_path, monkeypatch, comfy, model_files) -> Path:
    """A private set of ComfyUI model and output folders holding copies of the files."""
    import shutil

    import folder_paths

    root = tmp_path / "comfy"
    for sub in ("models/diffusion_models", "models/loras", "output"):
        (root / sub).mkdir(parents=True)
    for name in ("a", "b", "nan"):
        shutil.copy(model_files / f"{name}.safetensors", root / "models/diffusion_models")
    for name in (SD15_LORA, FLUX_LORA):
        shutil.copy(model_files / name, root / "models/loras")
    exts = set(folder_paths.supported_pt_extensions)
    for kind in ("diffusion_models", "loras"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind, ([str(root / "models" / kind)], exts))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(folder_paths, "output_directory", str(root / "output"))
    return root


def dense_changes(lora, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {n: m.dense_delta(shapes[n], torch.float64) for n, m in lora.modules.items()}


def model_shapes_by_module(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {"diffusion_model." + k[: -len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight")}


# ---------------------------------------------------------------------------- 1. Convert → Save keeps all


@pytest.mark.parametrize("save_as", ["same as input", "explicit"])
@pytest.mark.parametrize("fmt", ["diffusers", "onetrainer", "kohya", "comfy"])
@pytest.mark.parametrize("lora_name,shapes", [(SD15_LORA, sd_unet_shapes("sd15", "tiny")),
                                              (FLUX_LORA, flux_shapes(FluxConfig(), "dev"))], ids=["sd15", "flux"])
def test_convert_then_save_writes_every_module_in_the_format_it_names(nodes, folders, lora_name, shapes, fmt,
                                                                      save_as):
    loaded, _ = call(nodes, "WeightsmithLoadLoRA", lora_name=lora_name, arch="auto")["result"]
    n = len(loaded.modules)
    converted, report = call(nodes, "WeightsmithConvertLoRA", lora=loaded, target_format=fmt)["result"]
    assert f"{n} modules kept unchanged" in report
    assert len(converted.modules) == n and converted.source_format == fmt
    out = call(nodes, "WeightsmithSaveLoRA", lora=converted, filename_prefix=f"conv/{fmt}",
               format=fmt if save_as == "explicit" else "same as input")
    path = Path(out["result"][0])
    assert f"({fmt}, {loaded.arch}, {n} modules)" in out["ui"]["weightsmith_report"][0]
    back = ws_load_lora(path)
    assert (back.source_format, back.arch, len(back.modules)) == (fmt, loaded.arch, n)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["weightsmith.format"] == fmt
    by_module = model_shapes_by_module(shapes)
    want, got = dense_changes(loaded, by_module), dense_changes(back, by_module)
    for name, w in want.items():
        assert float((got[name] - w).norm()) <= 1e-6 * float(w.norm()), name


def test_convert_to_a_format_that_cannot_hold_a_module_names_them(nodes, folders):
    """A Flux LoRA with norm-gain diffs (what Extract stores): kohya has no key for `.scale` parameters, so
    Convert refuses naming each of them instead of reporting them kept and losing them at Save."""
    base = flux_state_dict(FluxConfig(), "dev", seed=1)
    lora, _ = pack("lora.extract").extract_lora(base, finetune(base, seed=2, noise=0.02), rank=4)
    scales = sorted(n for n in lora.modules if n.endswith(".scale"))
    assert len(scales) == 6
    with pytest.raises(pack("lora.formats").UnwritableError) as e:
        call(nodes, "WeightsmithConvertLoRA", lora=lora, target_format="kohya")
    assert all(f"{n} (no kohya name)" in str(e.value) for n in scales)
    assert_actionable(str(e.value))


# ------------------------------------------------------------------------------------- 2. merge weights


@pytest.mark.parametrize("weights", ["0,0", "nan,1", "1,inf"])
def test_merge_nodes_refuse_non_finite_and_all_zero_weights(nodes, folders, weights):
    before = folder_state(folders)
    error = pack("errors").WeightsmithError
    with pytest.raises(error, match="not a finite number|every weight is 0"):
        call(nodes, "WeightsmithMergeFiles", model_a="diffusion_models/a.safetensors",
             model_b="diffusion_models/b.safetensors", model_c="none", model_d="none", weights=weights)
    a = flux_patcher(flux_state_dict(FluxConfig(), "dev", seed=1))
    b = flux_patcher(flux_state_dict(FluxConfig(), "dev", seed=2))
    with pytest.raises(error, match="not a finite number|every weight is 0"):
        call(nodes, "WeightsmithMergeModels", model_a=a, model_b=b, weights=weights)
    assert folder_state(folders) == before


def test_merge_files_never_writes_a_nan_model(nodes, folders):
    before = folder_state(folders)
    with pytest.raises(pack("errors").WeightsmithError) as e:
        call(nodes, "WeightsmithMergeFiles", model_a="diffusion_models/a.safetensors",
             model_b="diffusion_models/nan.safetensors", model_c="none", model_d="none")
    assert_actionable(str(e.value), "img_in.weight", "nan.safetensors")
    assert folder_state(folders) == before


# --------------------------------------------------------------------------------- 3. Apply LoRA shapes


def test_apply_lora_refuses_a_lora_made_for_another_width(nodes):
    """A Flux LoRA for a 128-wide model on a 64-wide one: ComfyUI would log a shape error per layer and patch
    nothing while the node "succeeds". Refused naming each module and both shapes; nothing patched."""
    model = flux_patcher(flux_state_dict(FluxConfig(), "dev", seed=1))
    wide = random_lora(flux_shapes(FluxConfig(hidden=128, num_heads=2), "dev"), "flux", rank=4, seed=3,
                       targets=flux_block_linears)
    mine = pack("lora.formats").reformat_lora(wide, "kohya")  # the pack's own LoRA class, as Load LoRA makes it
    with LogCapture() as logs, pytest.raises(pack("errors").MismatchError) as e:
        call(nodes, "WeightsmithApplyLoRA", model=model, lora=mine, strength=1.0)
    message = str(e.value)
    assert f"{len(wide.modules)} module(s) of this flux LoRA do not fit this flux-dev model" in message
    assert "double_blocks.0.img_attn.qkv (LoRA [384, 128], model [192, 64])" in message
    assert_actionable(message)
    assert not logs.matching("SHAPE MISMATCH", "ERROR lora", "lora key not loaded")
    assert not model.patches
    # the same LoRA at the model's width applies, every module patched
    fits = random_lora(flux_shapes(FluxConfig(), "dev"), "flux", rank=4, seed=3, targets=flux_block_linears)
    (patched,) = call(nodes, "WeightsmithApplyLoRA", model=model,
                      lora=pack("lora.formats").reformat_lora(fits, "kohya"))
    assert len(patched.patches) == len(fits.modules)


def test_apply_lora_checks_row_slices_and_sd_convs(nodes):
    """diffusers' split q/k/v rows of a wider model, and an SD1.5 LoRA whose convs have other channels."""
    model = flux_patcher(flux_state_dict(FluxConfig(), "dev", seed=1))
    formats = pack("lora.formats")
    wide = random_lora(flux_shapes(FluxConfig(hidden=128, num_heads=2), "dev"), "flux", rank=2, seed=4,
                       targets=lambda k: k == "double_blocks.0.img_attn.qkv.weight")
    split = formats.reformat_lora(wide, "diffusers")  # q, k, v: row slices of the fused qkv
    assert len(split.modules["diffusion_model.double_blocks.0.img_attn.qkv"].terms) == 3
    with pytest.raises(pack("errors").MismatchError,
                       match=r"double_blocks\.0\.img_attn\.qkv \(LoRA rows \d+:\d+ of \[…, 128\], model \[192, 64\]\)"):
        call(nodes, "WeightsmithApplyLoRA", model=model, lora=split)
    sd = sd_unet_state_dict("sd15", "tiny", seed=0)
    unet = unet_patcher(sd, "sd15")
    narrow = {k: (s[0] // 2, *s[1:]) for k, s in sd_unet_shapes("sd15", "tiny").items()}
    lora = formats.reformat_lora(random_lora(narrow, "sd15", rank=2, seed=5), "kohya")
    with pytest.raises(pack("errors").MismatchError) as e:
        call(nodes, "WeightsmithApplyLoRA", model=unet, lora=lora)
    assert "input_blocks.0.0 (LoRA [160, 4, 3, 3], model [320, 4, 3, 3])" in str(e.value)


# ----------------------------------------------------------------------- 4. Extract → Save, like the CLI


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "onetrainer"])
def test_extract_then_save_refuses_with_the_cli_message(nodes, folders, fmt):
    lora, _, _ = call(nodes, "WeightsmithExtractLoRAFiles", base_model="diffusion_models/a.safetensors",
                      tuned_model="diffusion_models/b.safetensors", rank=4)["result"]
    before = folder_state(folders)
    with pytest.raises(pack("lora.formats").UnwritableError) as e:
        call(nodes, "WeightsmithSaveLoRA", lora=lora, filename_prefix="x/extracted", format=fmt)
    message = str(e.value)
    assert "store_diff" in message and "comfy" in message and "--no-diff" in message
    assert folder_state(folders) == before
    models = folders / "models" / "diffusion_models"
    r = subprocess.run([sys.executable, "-m", "weightsmith", "extract", str(models / "a.safetensors"),
                        str(models / "b.safetensors"), "-o", str(folders / "cli.safetensors"), "--rank", "4",
                        "--format", fmt], capture_output=True, text=True, env=os.environ, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {message}", (r.stderr, message)
    # store_diff off: the user's explicit choice; Save writes every module it got
    lora, _, _ = call(nodes, "WeightsmithExtractLoRAFiles", base_model="diffusion_models/a.safetensors",
                      tuned_model="diffusion_models/b.safetensors", rank=4, store_diff=False)["result"]
    path = Path(call(nodes, "WeightsmithSaveLoRA", lora=lora, filename_prefix="x/extracted", format=fmt)["result"][0])
    assert set(ws_load_lora(path).modules) == set(lora.modules)
