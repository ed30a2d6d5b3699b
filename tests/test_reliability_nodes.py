"""The nodes, in-process in the real ComfyUI, fed what a stranger's API call can send.

Output names (`filename_prefix`) with `..`, absolute paths, separators, NUL, control characters and
over-long names are refused or kept inside ComfyUI's folders, by every node that writes a file; existing
files and inputs are never overwritten (a counter picks the next name); an interrupt or an exception in
the middle of a node's file write leaves no file and no temp file; hostile files in the model folders
and input names that climb out of them are refused without running pickled code; a bad value in any
node fails with an error that says what to do.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from comfy_support import call_node as call
from comfy_support import flux_patcher, import_pack, unet_patcher
from reliability_cases import ESCAPING_PREFIXES, HOSTILE_FILES, MARKER, assert_actionable, folder_state
from safetensors.torch import save_file

from weightsmith.lora.formats import save_lora
from weightsmith.lora.testloras import flux_block_linears, random_lora
from weightsmith.sdunet import sd_unet_shapes, sd_unet_state_dict
from weightsmith.testmodels import FluxConfig, finetune, flux_shapes, flux_state_dict

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def nodes(comfy):
    return import_pack().NODE_CLASS_MAPPINGS


def load_lora(path: Path):
    """A LORA socket value: the pack's own LoRA object (its core is a copy distinct from `weightsmith`)."""
    import importlib

    return importlib.import_module(import_pack().__name__ + ".core.lora.formats").load_lora(path)


def pack_error(name: str) -> type[Exception]:
    """The pack's own error class: ComfyUI imports the core as `<pack>.core`, a copy distinct from `weightsmith`."""
    if name in ("ValueError", "FileNotFoundError"):
        return {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}[name]
    import importlib

    return getattr(importlib.import_module(import_pack().__name__ + ".core.errors"), name)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> Path:
    """Three small Flux dev files and two LoRAs (Flux, SD1.5), made once; each test copies them."""
    d = tmp_path_factory.mktemp("reliability_node_models")
    base = flux_state_dict(FluxConfig(), "dev", seed=1)
    for name, sd in (("a", base), ("b", finetune(base, seed=2, rank=4, scale=0.05)),
                     ("c", finetune(base, seed=3, rank=4, scale=0.05))):
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(d / f"{name}.safetensors"))
    save_lora(random_lora(flux_shapes(FluxConfig(), "dev"), "flux", rank=4, seed=5, targets=flux_block_linears),
              d / "flux_lora.safetensors", fmt="kohya")
    save_lora(random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=4, seed=9), d / "sd15_lora.safetensors",
              fmt="kohya")
    return d


@dataclass
class Folders:
    root: Path  # everything ComfyUI may touch lives under here
    diffusion_models: Path
    checkpoints: Path
    loras: Path
    output: Path


@pytest.fixture
def folders(tmp_path, monkeypatch, comfy, model_files) -> Folders:
    import folder_paths

    root = tmp_path / "comfy"
    f = Folders(root, root / "models" / "diffusion_models", root / "models" / "checkpoints", root / "models" / "loras",
                root / "output")
    for d in (f.diffusion_models, f.checkpoints, f.loras, f.output):
        d.mkdir(parents=True)
    for name in "abc":
        shutil.copy(model_files / f"{name}.safetensors", f.diffusion_models)
    for name in ("flux_lora", "sd15_lora"):
        shutil.copy(model_files / f"{name}.safetensors", f.loras)
    exts = set(folder_paths.supported_pt_extensions)
    for kind in ("diffusion_models", "checkpoints", "loras"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind, ([str(getattr(f, kind))], exts))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(folder_paths, "output_directory", str(f.output))
    return f




def merge_files(nodes, prefix="weightsmith/merged", **kw):
    inputs = {"model_a": "diffusion_models/a.safetensors", "model_b": "diffusion_models/b.safetensors",
              "model_c": "none", "model_d": "none", "filename_prefix": prefix}
    return call(nodes, "WeightsmithMergeFiles", **{**inputs, **kw})


def mix_files(nodes, prefix="weightsmith/mix", **kw):
    return call(nodes, "WeightsmithLosslessMixFiles", model_a="diffusion_models/a.safetensors",
                model_b="diffusion_models/b.safetensors", model_c="diffusion_models/c.safetensors",
                filename_prefix=prefix, **kw)


def save_lora_node(nodes, folders, prefix="weightsmith/lora"):
    lora = load_lora(folders.loras / "flux_lora.safetensors")
    return call(nodes, "WeightsmithSaveLoRA", lora=lora, filename_prefix=prefix)


def bake_node(nodes, folders, prefix="weightsmith/baked", model="diffusion_models/a.safetensors"):
    return call(nodes, "WeightsmithBakeLoRAs", model=model, lora_1=load_lora(folders.loras / "flux_lora.safetensors"),
                filename_prefix=prefix)


WRITERS = {
    "bake": lambda nodes, f, prefix: bake_node(nodes, f, prefix),
    "merge_files_output": lambda nodes, f, prefix: merge_files(nodes, prefix, output_folder="output"),
    "merge_files_diffusion_models": lambda nodes, f, prefix: merge_files(nodes, prefix, output_folder="diffusion_models"),
    "mix_files": lambda nodes, f, prefix: mix_files(nodes, prefix),
    "save_lora": lambda nodes, f, prefix: save_lora_node(nodes, f, prefix),
    "save_model": lambda nodes, f, prefix: call(nodes, "WeightsmithSaveModel", model=_flux(), filename_prefix=prefix),
}


# ------------------------------------------------------------------------------------------- output names


@pytest.mark.parametrize("prefix", sorted(ESCAPING_PREFIXES))
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_escaping_prefixes_are_refused_and_nothing_is_written(nodes, folders, tmp_path, writer, prefix):
    before = folder_state(tmp_path)
    outside = [Path("/tmp/weightsmith-escaped"), tmp_path / "escaped", folders.root / "escaped"]
    with pytest.raises(pack_error("OutputPathError")) as e:
        WRITERS[writer](nodes, folders, ESCAPING_PREFIXES[prefix])
    assert "prefix" in str(e.value)
    assert_actionable(str(e.value))
    assert folder_state(tmp_path) == before
    assert not [p for p in outside if any(p.parent.glob(p.name + "*"))]


@pytest.mark.parametrize("prefix,where", [("sub/dir/x", "sub/dir"), ("sub\\win\\x", "sub/win"), ("./x", "."),
                                          ("weird name ü-ß.v2", ".")])
def test_separators_make_subfolders_inside_the_folder(nodes, folders, prefix, where):
    path = Path(save_lora_node(nodes, folders, prefix)["result"][0])
    assert path.parent.resolve() == (folders.loras / where).resolve()
    assert path.resolve().is_relative_to(folders.loras.resolve())
    assert path.name.endswith("_00001_.safetensors")


def test_symlinked_subfolder_pointing_outside_is_refused(nodes, folders, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (folders.loras / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(pack_error("OutputPathError"), match="outside"):
        save_lora_node(nodes, folders, "evil/x")
    assert list(outside.iterdir()) == []


def test_counter_never_overwrites_outputs_or_inputs(nodes, folders):
    keep = folders.loras / "weightsmith" / "lora_00001_.safetensors"
    keep.parent.mkdir()
    keep.write_bytes(b"an earlier output")
    first = Path(save_lora_node(nodes, folders)["result"][0])
    second = Path(save_lora_node(nodes, folders)["result"][0])
    assert (first.name, second.name) == ("lora_00002_.safetensors", "lora_00003_.safetensors")
    assert keep.read_bytes() == b"an earlier output"
    # an output named like an input lands beside it under a counter; the input is untouched
    a = folders.diffusion_models / "a.safetensors"
    before = a.read_bytes()
    out = Path(merge_files(nodes, "a", output_folder="diffusion_models")["result"][0])
    assert out == folders.diffusion_models / "a_00001_.safetensors" and a.read_bytes() == before
    flux_lora = folders.loras / "flux_lora.safetensors"
    before = flux_lora.read_bytes()
    assert Path(save_lora_node(nodes, folders, "flux_lora")["result"][0]).name == "flux_lora_00001_.safetensors"
    assert flux_lora.read_bytes() == before


# ------------------------------------------------------------------------------------ atomic file writes


class _Hook:
    """ComfyUI's progress hook: on the n-th update, interrupt (as the Cancel button does) or raise, after
    checking that the node's temp file is there (the write is under way)."""

    def __init__(self, folder: Path, at: int, action: str):
        self.folder, self.at, self.action = folder, at, action
        self.calls = 0
        self.temp_seen: list[str] = []

    def __call__(self, value, total, preview, node_id=None):
        import comfy.model_management as mm

        self.calls += 1
        if self.calls == self.at:
            self.temp_seen = [p.name for p in self.folder.rglob(".*.tmp")]
            if self.action == "interrupt":
                mm.interrupt_current_processing(True)
            else:
                raise RuntimeError("simulated crash during the write")


@pytest.mark.parametrize("action", ["interrupt", "raise"])
@pytest.mark.parametrize("writer", ["merge_files_diffusion_models", "mix_files", "bake", "save_model"])
def test_interrupt_or_crash_mid_write_leaves_no_file(nodes, folders, tmp_path, writer, action):
    import comfy.model_management as mm
    import comfy.utils

    out_dir = folders.diffusion_models
    hook = _Hook(out_dir, at=5, action=action)
    before = folder_state(tmp_path)
    comfy.utils.set_progress_bar_global_hook(hook)
    expected = mm.InterruptProcessingException if action == "interrupt" else RuntimeError
    try:
        with pytest.raises(expected):
            WRITERS[writer](nodes, folders, "weightsmith/interrupted")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert hook.temp_seen, "the hook fired before the node started writing: nothing was tested"
    assert folder_state(tmp_path) == before, "partial or temp file left behind"
    # the same node then writes normally
    path = Path(WRITERS[writer](nodes, folders, "weightsmith/after")["result"][0])
    assert path.is_file() and path.stat().st_size > 0


# --------------------------------------------------------------------------------- hostile input files

INPUT_CASES = ["truncated", "corrupt_header", "zero_length", "pickle_ckpt", "pickle_pt", "unsupported_dtype",
               "huge_shape"]

# node -> call(nodes, folders, the hostile file's name in its folder); combos of model files name the folder
FILE_READERS = {
    "bake": lambda nodes, f, name: bake_node(nodes, f, model=f"diffusion_models/{name}"),
    "merge_files": lambda nodes, f, name: merge_files(nodes, model_b=f"diffusion_models/{name}"),
    "mix_files": lambda nodes, f, name: call(nodes, "WeightsmithLosslessMixFiles", model_a="diffusion_models/a.safetensors",
                                             model_b="diffusion_models/b.safetensors", model_c=f"diffusion_models/{name}"),
    "extract_files": lambda nodes, f, name: call(nodes, "WeightsmithExtractLoRAFiles",
                                                 base_model="diffusion_models/a.safetensors",
                                                 tuned_model=f"diffusion_models/{name}", rank=4),
    "validate": lambda nodes, f, name: call(nodes, "WeightsmithValidateLoRA", base_model=f"diffusion_models/{name}",
                                            tuned_model="diffusion_models/b.safetensors",
                                            lora=load_lora(f.loras / "flux_lora.safetensors")),
    "load_lora": lambda nodes, f, name: call(nodes, "WeightsmithLoadLoRA", lora_name=name),
}


@pytest.mark.parametrize("case", INPUT_CASES)
@pytest.mark.parametrize("reader", sorted(FILE_READERS))
def test_hostile_files_in_model_folders_are_refused(nodes, folders, tmp_path, reader, case):
    folder = folders.loras if reader == "load_lora" else folders.diffusion_models
    bad = HOSTILE_FILES[case](folder, folders.diffusion_models / "a.safetensors")
    before = folder_state(tmp_path)
    with pytest.raises(pack_error("BadFileError")) as e:
        FILE_READERS[reader](nodes, folders, bad.name)
    assert_actionable(str(e.value), bad)
    assert not (folder / MARKER).exists(), "pickled code ran"
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("name", ["diffusion_models/../../secret.safetensors", "diffusion_models//etc/secret.safetensors",
                                  "diffusion_models/../models/../../secret.safetensors", "../secret.safetensors"])
def test_input_names_cannot_reach_outside_the_model_folders(nodes, folders, tmp_path, name):
    secret = folders.root / "secret.safetensors"
    shutil.copy(folders.diffusion_models / "b.safetensors", secret)
    (folders.root / "models" / "secret.safetensors").symlink_to(secret)
    with pytest.raises((pack_error("BadFileError"), FileNotFoundError)) as e:
        merge_files(nodes, model_b=name, dry_run=True)
    assert "secret" in str(e.value)
    with pytest.raises(FileNotFoundError):
        call(nodes, "WeightsmithLoadLoRA", lora_name=name.split("/", 1)[-1])


# ------------------------------------------------------------------------------ bad values in every node


def _flux():
    return flux_patcher(flux_state_dict(FluxConfig(), "dev", seed=1))


def _sd15():
    return unet_patcher(sd_unet_state_dict("sd15", "tiny", seed=1), "sd15")


def _lora(folders, name):
    return load_lora(folders.loras / f"{name}.safetensors")


# node -> (inputs built from the folders, the error it must raise): one bad request per node type
BAD_REQUESTS = {
    "WeightsmithMergeModels": (lambda f: {"model_a": _flux(), "model_b": _sd15()}, "MismatchError"),
    "WeightsmithMergeFiles": (lambda f: {"model_a": "diffusion_models/a.safetensors",
                                         "model_b": "diffusion_models/b.safetensors", "rules": "(unclosed=take:A"},
                              "WeightsmithError"),
    "WeightsmithLosslessMix": (lambda f: {"model_a": _flux(), "model_b": _flux(), "model_c": _sd15()}, "MismatchError"),
    "WeightsmithLosslessMixFiles": (lambda f: {"model_a": "diffusion_models/a.safetensors",
                                               "model_b": "diffusion_models/b.safetensors",
                                               "model_c": "diffusion_models/c.safetensors",
                                               "filename_prefix": "../escaped"}, "OutputPathError"),
    "WeightsmithExtractLoRA": (lambda f: {"base": _flux(), "tuned": _sd15()}, "MismatchError"),
    "WeightsmithExtractLoRAFiles": (lambda f: {"base_model": "diffusion_models/a.safetensors",
                                               "tuned_model": "diffusion_models/b.safetensors",
                                               "rank_mode": "no-such-mode"}, ("WeightsmithError", "ValueError")),
    "WeightsmithValidateLoRA": (lambda f: {"base_model": "diffusion_models/a.safetensors",
                                           "tuned_model": "diffusion_models/b.safetensors",
                                           "lora": _lora(f, "sd15_lora")}, "MismatchError"),
    "WeightsmithLoadLoRA": (lambda f: {"lora_name": "flux_lora.safetensors", "arch": "sd15"}, "MismatchError"),
    "WeightsmithSaveLoRA": (lambda f: {"lora": _lora(f, "flux_lora"), "filename_prefix": "/etc/escaped"},
                            "OutputPathError"),
    "WeightsmithConvertLoRA": (lambda f: {"lora": _lora(f, "sd15_lora"), "target_arch": "flux"}, "MismatchError"),
    "WeightsmithFluxToChroma": (lambda f: {"lora": _lora(f, "sd15_lora")}, "MismatchError"),
    "WeightsmithReprojectFluxToChroma": (lambda f: {"lora": _lora(f, "sd15_lora"),
                                                    "flux_model": "diffusion_models/a.safetensors",
                                                    "chroma_model": "diffusion_models/b.safetensors"}, "WeightsmithError"),
    "WeightsmithApplyLoRA": (lambda f: {"model": _flux(), "lora": _lora(f, "sd15_lora")}, "MismatchError"),
    "WeightsmithComposeLoRAs": (lambda f: {"lora_1": _lora(f, "flux_lora"), "lora_2": _lora(f, "sd15_lora")},
                                "MismatchError"),
    "WeightsmithBakeLoRAs": (lambda f: {"model": "diffusion_models/a.safetensors", "lora_1": _lora(f, "sd15_lora")},
                             "MismatchError"),
    "WeightsmithRerankLoRA": (lambda f: {"lora": _lora(f, "flux_lora"), "rank": 0, "energy": 0.0}, "ValueError"),
    "WeightsmithSaveModel": (lambda f: {"model": _flux(), "dtype": "fp4"}, "WeightsmithError"),
    # ComfyUI's LORA_MODEL bridges: a state dict that is no LoRA, and a LoRA with nothing in it
    "WeightsmithLoRAFromLoraModel": (lambda f: {"lora_model": {"model.conv.weight": torch.zeros(4, 4)}},
                                     ("BadFileError", "MismatchError")),
    "WeightsmithLoRAToLoraModel": (lambda f: {"lora": _empty_lora()}, "MismatchError"),
}


def _empty_lora():
    import importlib

    return importlib.import_module(import_pack().__name__ + ".core.lora.model").LoRA(modules={}, arch="flux")


def test_every_node_type_has_a_bad_request_case(nodes):
    assert sorted(BAD_REQUESTS) == sorted(nodes), "a node type without a reliability case"


@pytest.mark.parametrize("node", sorted(BAD_REQUESTS))
def test_bad_request_to_each_node_fails_clearly_and_writes_nothing(nodes, folders, tmp_path, node):
    build, error = BAD_REQUESTS[node]
    error = tuple(pack_error(n) for n in error) if isinstance(error, tuple) else pack_error(error)
    inputs = build(folders)
    before = folder_state(tmp_path)
    with pytest.raises(error) as e:
        call(nodes, node, **inputs)
    assert_actionable(str(e.value))
    assert folder_state(tmp_path) == before


def test_compose_without_inputs_and_apply_at_strength_zero(nodes, folders):
    with pytest.raises(ValueError, match="connect at least one LoRA"):
        call(nodes, "WeightsmithComposeLoRAs")
    model = _flux()
    (same,) = call(nodes, "WeightsmithApplyLoRA", model=model, lora=_lora(folders, "flux_lora"), strength=0.0)
    assert same is model
