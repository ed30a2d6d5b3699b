"""One consistent interface, ComfyUI's conventions (issue 21 items 3, 4, 5), in-process against the real
ComfyUI: conv_rank means the same in the node and the CLI; every model-file picker lists the same choices
(diffusion_models, unet, checkpoints) and every model writer the same output folders, defaulting to where
Load Diffusion Model finds the file; one output order; a numeric ratio on the merges; equal strength
ranges; no display name shared with a core node; ComfyUI's own LORA_MODEL type in and out; error types
that are not file paths. The server-side half (validation before anything runs) is in
test_node_semantics_server.py."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from comfy_support import call_node as call
from comfy_support import import_comfy, import_pack
from safetensors.torch import load_file

from weightsmith.sdunet import write_sd15_tiny
from weightsmith.testmodels import finetune

pytestmark = pytest.mark.comfy

PICKER_NODES = {  # node -> its model-file inputs (issue 21 item 4: Merge/Mix/Extract/Validate/Re-project/Bake)
    "WeightsmithMergeFiles": ("model_a", "model_b"),
    "WeightsmithLosslessMixFiles": ("model_a", "model_b", "model_c"),
    "WeightsmithExtractLoRAFiles": ("base_model", "tuned_model"),
    "WeightsmithValidateLoRA": ("base_model", "tuned_model"),
    "WeightsmithReprojectFluxToChroma": ("flux_model", "chroma_model"),
    "WeightsmithBakeLoRAs": ("model",),
}
MODEL_WRITERS = ("WeightsmithMergeFiles", "WeightsmithLosslessMixFiles", "WeightsmithBakeLoRAs")


@pytest.fixture(scope="module")
def pack():
    import_comfy()
    return import_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return pack.NODE_CLASS_MAPPINGS


def pack_module(pack, name: str):
    return importlib.import_module(f"{pack.__name__}.{name}")


@pytest.fixture(scope="module")
def sd15_pair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sd15")
    write_sd15_tiny(d / "base.safetensors", seed=3)
    base = load_file(d / "base.safetensors")
    from weightsmith.safetensors_io import write_safetensors

    write_safetensors(d / "tuned.safetensors", finetune(base, seed=4, rank=4))
    return d / "base.safetensors", d / "tuned.safetensors"


@pytest.fixture
def folders(tmp_path, monkeypatch, sd15_pair):
    """ComfyUI's model folders as a user has them: a file in diffusion_models, one in the legacy unet folder,
    one in checkpoints."""
    import folder_paths

    root = tmp_path / "models"
    dirs = {k: root / k for k in ("diffusion_models", "unet", "checkpoints", "loras")}
    for d in dirs.values():
        d.mkdir(parents=True)
    shutil.copy(sd15_pair[0], dirs["diffusion_models"] / "base.safetensors")
    shutil.copy(sd15_pair[1], dirs["unet"] / "tuned.safetensors")
    shutil.copy(sd15_pair[0], dirs["checkpoints"] / "ckpt.safetensors")
    exts = set(folder_paths.supported_pt_extensions)
    # as ComfyUI registers them: the unet folder is a path of diffusion_models
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(dirs["unet"]), str(dirs["diffusion_models"])], exts))
    for kind in ("checkpoints", "loras"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind, ([str(dirs[kind])], exts))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "output", ([str(tmp_path / "output")], set()))
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return dirs


def spec(cls, name: str):
    s = cls.INPUT_TYPES()
    return s["required"].get(name) or s.get("optional", {}).get(name)




# -- item 3: conv_rank -----------------------------------------------------------------------------------

def _conv_modules(lora) -> set[str]:
    return {n for n, m in lora.modules.items() for t in m.terms if t.down.ndim == 4 and t.down.shape[-1] > 1}


def test_conv_rank_has_one_meaning_in_the_node_and_the_cli(nodes, folders, tmp_path, capsys):
    from weightsmith.cli import main
    from weightsmith.lora.formats import load_lora

    got = {}
    for conv_rank in (-1, 0):
        lora, _, _ = call(nodes, "WeightsmithExtractLoRAFiles", base_model="diffusion_models/base.safetensors",
                          tuned_model="diffusion_models/tuned.safetensors", rank=4, conv_rank=conv_rank,
                          store_diff=False, dtype="fp32")["result"]
        out = tmp_path / f"cli_{conv_rank}.safetensors"
        assert main(["extract", str(folders["diffusion_models"] / "base.safetensors"),
                     str(folders["unet"] / "tuned.safetensors"), "-o", str(out), "--rank", "4",
                     "--conv-rank", str(conv_rank), "--no-diff", "--dtype", "fp32"]) == 0
        cli = load_lora(out)
        assert set(lora.modules) == set(cli.modules), conv_rank
        got[conv_rank] = ({n: max(t.rank for t in m.terms) for n, m in lora.modules.items() if n in _conv_modules(lora)})
    assert got[0] == {}, "conv_rank 0 leaves k×k convolutions out"
    assert got[-1] and set(got[-1].values()) <= {1, 2, 3, 4}, "conv_rank -1 extracts them at rank"
    spec_ = spec(nodes["WeightsmithExtractLoRAFiles"], "conv_rank")[1]
    assert spec_["default"] == -1 and spec_["min"] == -1 and "0 = leave them out" in spec_["tooltip"]


# -- item 4: one picker, one output folder list, one output order -------------------------------------------

def test_every_model_file_picker_lists_the_same_choices_from_all_three_folders(nodes, folders):
    choices = {(n, i): spec(nodes[n], i)[0] for n, inputs in PICKER_NODES.items() for i in inputs}
    first = next(iter(choices.values()))
    assert {"diffusion_models/base.safetensors", "diffusion_models/tuned.safetensors",
            "checkpoints/ckpt.safetensors"} <= set(first), first  # the unet folder's file is listed too
    for where, listed in choices.items():
        assert listed == first, f"{where} lists other choices: {listed}"
    # a file picked from the legacy unet folder resolves and is read
    lora, text, _ = call(nodes, "WeightsmithExtractLoRAFiles", base_model="checkpoints/ckpt.safetensors",
                         tuned_model="diffusion_models/tuned.safetensors", rank=2)["result"]
    assert lora.modules


def test_model_writers_share_one_output_folder_list_defaulting_to_diffusion_models(nodes, folders):
    lists = {n: spec(nodes[n], "output_folder") for n in MODEL_WRITERS}
    for name, (options, opts) in lists.items():
        assert options == ["diffusion_models", "checkpoints", "output"] and opts["default"] == "diffusion_models", name
    # the default lands where Load Diffusion Model lists it
    import folder_paths

    out = Path(call(nodes, "WeightsmithMergeFiles", model_a="diffusion_models/base.safetensors",
                    model_b="diffusion_models/tuned.safetensors", model_c="none", model_d="none",
                    filename_prefix="merged")["result"][0])
    folder_paths.filename_list_cache.clear()
    assert out.name in folder_paths.get_filename_list("diffusion_models")


def test_one_output_order_result_report_chart(nodes):
    for name, cls in nodes.items():
        names = list(cls.RETURN_NAMES)
        if "report" in names and "chart" in names:
            assert names.index("chart") == len(names) - 1 and names.index("report") == len(names) - 2, (name, names)
        if "report" in names and len(names) > 1:
            assert names.index("report") >= len(names) - 2, (name, names)


# -- item 5: core-node conventions ----------------------------------------------------------------------------

def test_ratio_is_a_numeric_input_like_model_merge_simple(nodes, folders):
    for name in ("WeightsmithMergeModels", "WeightsmithMergeFiles"):
        kind, opts = spec(nodes[name], "ratio")
        assert kind == "FLOAT" and (opts["min"], opts["max"]) == (0.0, 1.0) and not opts.get("forceInput"), name
    files = dict(model_a="diffusion_models/base.safetensors", model_b="diffusion_models/tuned.safetensors",
                 model_c="none", model_d="none", dry_run=True)
    by_ratio = json.loads(call(nodes, "WeightsmithMergeFiles", ratio=0.3, **files)["ui"]["weightsmith_json"][0])
    by_weights = json.loads(call(nodes, "WeightsmithMergeFiles", weights="0.3,0.7", **files)["ui"]["weightsmith_json"][0])
    assert by_ratio["plan"]["weights"] == by_weights["plan"]["weights"] == pytest.approx([0.3, 0.7])
    errors = pack_module(import_pack(), "core.errors")
    with pytest.raises(errors.WeightsmithError, match="both set"):
        call(nodes, "WeightsmithMergeFiles", ratio=0.3, weights="0.5,0.5", **files)
    with pytest.raises(errors.WeightsmithError, match="two-model"):
        call(nodes, "WeightsmithMergeFiles", ratio=0.3, method="ties", **files)
    with pytest.raises(errors.WeightsmithError, match="between 0 and 1"):
        call(nodes, "WeightsmithMergeFiles", ratio=1.5, **files)


def test_model_merge_simple_ratio_equals_merge_models_ratio(nodes, folders):
    import comfy.sd
    import comfy_extras.nodes_model_merging as mm_nodes

    a = comfy.sd.load_diffusion_model(str(folders["diffusion_models"] / "base.safetensors"))
    b = comfy.sd.load_diffusion_model(str(folders["unet"] / "tuned.safetensors"))
    ours = call(nodes, "WeightsmithMergeModels", model_a=a, model_b=b, ratio=0.3, report=False)["result"][0]
    (core,) = mm_nodes.ModelMergeSimple().merge(a, b, 0.3)
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    w_ours = ours.get_key_patches("diffusion_model.")
    w_core = core.get_key_patches("diffusion_model.")
    common = pack_module(import_pack(), "nodes.common")
    cpu = torch.device("cpu")
    assert torch.allclose(common.effective_weight(w_ours[key], cpu, key), common.effective_weight(w_core[key], cpu, key),
                          atol=1e-6)


def test_one_line_per_method_in_the_tooltip_and_equal_strength_ranges(nodes):
    tip = spec(nodes["WeightsmithMergeModels"], "method")[1]["tooltip"]
    methods = spec(nodes["WeightsmithMergeModels"], "method")[0]
    lines = tip.splitlines()[1:]
    assert len(lines) == len(methods) and all(ln.startswith(f"• {m} ") for ln, m in zip(lines, methods))
    assert max(len(ln) for ln in lines) < 140
    ranges = {}
    for name, cls in nodes.items():
        for section in ("required", "optional"):
            for inp, (kind, *rest) in cls.INPUT_TYPES().get(section, {}).items():
                if kind == "FLOAT" and inp.startswith("strength"):
                    ranges[(name, inp)] = (rest[0]["min"], rest[0]["max"])
    assert len(ranges) >= 10 and len(set(ranges.values())) == 1, ranges


def test_fp8_where_save_offers_it(nodes):
    save = spec(nodes["WeightsmithSaveLoRA"], "dtype")[0]
    for name in MODEL_WRITERS:
        kind = spec(nodes[name], "dtype")[0]
        assert {d for d in save if d.startswith("fp8")} <= set(kind), name


def test_no_display_name_collides_with_a_core_node(pack):
    import nodes as core_nodes

    ours = pack.NODE_DISPLAY_NAME_MAPPINGS
    core = {v for k, v in core_nodes.NODE_DISPLAY_NAME_MAPPINGS.items() if k not in ours}
    core |= {"Load LoRA", "Load LoRA Model", "Save LoRA Weights", "Save Model"}
    bare = {n.removesuffix(" (Weightsmith)") for n in ours.values()}
    assert not bare & core, bare & core
    assert set(ours) == set(pack.NODE_CLASS_MAPPINGS)


def test_error_types_are_not_file_paths(pack):
    errors = pack_module(pack, "core.errors")
    fmt = pack_module(pack, "core.lora.formats_base")
    for cls in (errors.WeightsmithError, errors.BadFileError, errors.MismatchError, fmt.UnwritableError):
        assert "/" not in cls.__module__ and "\\" not in cls.__module__, cls.__module__


# -- item 5: ComfyUI's LORA_MODEL ----------------------------------------------------------------------------

def test_lora_model_round_trip_through_comfyuis_own_load_lora_model(nodes, folders):
    import comfy.sd
    from comfy_extras.nodes_train import LoraModelLoader

    lora, _, _ = call(nodes, "WeightsmithExtractLoRAFiles", base_model="diffusion_models/base.safetensors",
                      tuned_model="diffusion_models/tuned.safetensors", rank=4, dtype="fp32")["result"]
    sd, text = call(nodes, "WeightsmithLoRAToLoraModel", lora=lora)["result"]
    assert isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()) and "modules" in text
    model = comfy.sd.load_diffusion_model(str(folders["diffusion_models"] / "base.safetensors"))
    core = LoraModelLoader.execute(model, sd, 0.7).result[0]
    (ours,) = call(nodes, "WeightsmithApplyLoRA", model=model, lora=lora, strength=0.7)  # returns a plain tuple
    common = pack_module(import_pack(), "nodes.common")
    kc, ko = core.get_key_patches("diffusion_model."), ours.get_key_patches("diffusion_model.")
    cpu = torch.device("cpu")
    for key in list(kc)[::25]:
        assert torch.allclose(common.effective_weight(kc[key], cpu, key), common.effective_weight(ko[key], cpu, key),
                              atol=1e-5), key
    back, _ = call(nodes, "WeightsmithLoRAFromLoraModel", lora_model=sd)["result"]
    assert set(back.modules) == set(lora.modules) and back.arch == lora.arch
    for name, m in lora.modules.items():
        shape = tuple(m.terms[0].up.shape[:1]) + tuple(m.terms[0].down.shape[1:]) if m.terms else None
        if shape:
            assert torch.allclose(back.modules[name].dense_delta(shape), m.dense_delta(shape), atol=1e-6), name
