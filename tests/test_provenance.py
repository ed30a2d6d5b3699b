"""Provenance: every output kind (merge, mix, bake, extract, convert, compose, rerank; safetensors and GGUF;
CLI and nodes) carries modelspec.* keys with the right architecture id, a weightsmith.recipe naming every
parameter and each input's fingerprint, the tensor data's sha256, and for LoRAs kohya's ss_* keys; input
metadata that describes an input is not inherited; `inspect` and the Load LoRA node show it; ComfyUI
0.3.75 still loads every output."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from weightsmith.cli import main
from weightsmith.provenance import (
    HASH_KEY,
    RECIPE_KEY,
    fingerprint_file,
    fingerprint_input,
    inherited,
    modelspec_architecture,
)
from weightsmith.sdunet import write_sd15_tiny, write_sd_unet
from weightsmith.testmodels import FluxConfig, flux_shapes, write_model

CFG = FluxConfig()


def meta_of(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def data_sha256(path) -> str:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return "0x" + hashlib.sha256(raw[8 + n:]).hexdigest()


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    d = tmp_path_factory.mktemp("prov")
    shapes = flux_shapes(CFG, "dev")
    for i, name in enumerate("abc"):
        write_model(d / f"{name}.safetensors", shapes, seed=i)
    # a foreign tool's metadata on A: none of it may reappear in an output as if it described the output
    write_model(d / "tagged.safetensors", shapes, seed=0, metadata={
        "modelspec.title": "Someone's model", "modelspec.architecture": "stable-diffusion-v1", "ss_network_dim": "999",
        "sshs_model_hash": "abc", "prompt": "{}", "workflow": "{}", RECIPE_KEY: '{"operation": "forged"}',
        "modelspec.hash_sha256": "0x" + "0" * 64})
    assert main(["extract", str(d / "a.safetensors"), str(d / "b.safetensors"), "-o", str(d / "l1.safetensors"),
                 "--rank", "4", "--no-diff"]) == 0
    assert main(["extract", str(d / "a.safetensors"), str(d / "c.safetensors"), "-o", str(d / "l2.safetensors"),
                 "--rank", "2", "--no-diff", "--format", "kohya"]) == 0
    return d


def _run(d, kind: str):
    """Run one output kind through the CLI; (output path, expected modelspec architecture, is a LoRA)."""
    p = {n: str(d / f"{n}.safetensors") for n in ("a", "b", "c", "l1", "l2", "tagged")}
    out = d / f"out_{kind}.safetensors"
    argv = {
        "merge": ["merge", p["a"], p["b"], "-o", str(out), "--method", "dare", "--param", "drop_rate=0.5",
                  "--param", "seed=7", "--rule", "@single=take:A"],
        "mix": ["mix", p["tagged"], p["b"], p["c"], "-o", str(out), "--alpha", "0.9"],
        "bake": ["bake", p["a"], f"{p['l1']}:0.8", f"{p['l2']}:0.5", "-o", str(out), "--rule", "@single=0.5"],
        "extract": ["extract", p["a"], p["c"], "-o", str(out), "--rank", "3", "--seed", "5"],
        "convert": ["convert", p["l2"], "-o", str(out), "--to", "comfy"],
        "compose": ["compose", f"{p['l1']}:0.8", f"{p['l2']}:-0.5", "-o", str(out), "--rank", "3"],
        "rerank": ["rerank", p["l1"], "-o", str(out), "--rank", "2"],
    }[kind]
    if not out.exists():
        assert main(argv) == 0
    lora = kind in ("extract", "convert", "compose", "rerank")
    return out, argv, ("flux-1-dev/lora" if lora else "flux-1-dev"), lora


KINDS = ["merge", "mix", "bake", "extract", "convert", "compose", "rerank"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_output_kind_carries_modelspec_recipe_and_hash(flux, kind):
    out, argv, arch, lora = _run(flux, kind)
    meta = meta_of(out)
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == arch
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["modelspec.title"] == out.stem and meta["modelspec.date"].startswith("20")
    assert meta[HASH_KEY] == data_sha256(out)  # sha256 of every tensor byte, in file order
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe["operation"] == kind and recipe["via"] == "cli" and recipe["tool"] == "weightsmith"
    assert recipe["version"] and recipe["params"]["output"] == str(out)
    inputs = [a for a in argv[1:] if a.endswith(".safetensors") and a != str(out)] + \
        [a.rsplit(":", 1)[0] for a in argv[1:] if ".safetensors:" in a]
    assert sorted(i["given"] for i in recipe["inputs"]) == sorted(inputs)
    for i in recipe["inputs"]:
        assert i == {**i, **fingerprint_input(i["given"])}  # name, absolute path, size and fingerprint
    if lora:
        assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_dim"].isdigit()
        assert float(meta["ss_network_alpha"]) > 0
    else:
        assert not any(k.startswith("ss_") for k in meta)
    if kind in ("merge", "mix", "bake", "compose"):
        assert meta["modelspec.merged_from"]
    # the weightsmith summaries other code reads are still there, consistent with the recipe
    legacy = {"merge": "weightsmith.merge", "mix": "weightsmith.mix", "bake": "weightsmith.bake",
              "compose": "weightsmith.compose", "extract": "weightsmith.extract"}.get(kind)
    if legacy:
        assert legacy in meta


def test_recipe_records_every_parameter_rules_and_seed(flux):
    out, _, _, _ = _run(flux, "merge")
    recipe = json.loads(meta_of(out)[RECIPE_KEY])
    params = recipe["params"]
    assert params["method"] == "dare" and params["param"] == ["drop_rate=0.5", "seed=7"]
    assert recipe["rules"] == ["@single=take:A"] and recipe["seed"] == 7
    # every option of the command is recorded, defaults included (a later option is recorded the same way)
    assert {"weights", "missing", "others", "dtype", "device", "preset", "nonfinite"} <= set(params)
    assert [i["role"] for i in recipe["inputs"]] == ["models[0]", "models[1]"]
    out, _, _, _ = _run(flux, "extract")
    recipe = json.loads(meta_of(out)[RECIPE_KEY])
    assert recipe["seed"] == 5 and recipe["params"]["rank"] == 3
    assert [i["role"] for i in recipe["inputs"]] == ["base", "tuned"]


def test_input_metadata_is_not_inherited(flux):
    out, _, _, _ = _run(flux, "mix")  # A is the tagged file
    meta = meta_of(out)
    assert meta["modelspec.architecture"] == "flux-1-dev" and meta["modelspec.title"] == out.stem
    for k in ("ss_network_dim", "sshs_model_hash", "prompt", "workflow"):
        assert k not in meta
    assert json.loads(meta[RECIPE_KEY])["operation"] == "mix"
    assert meta[HASH_KEY] == data_sha256(out)
    # kohya's merged_from names each input by its own title, else its file name
    assert meta["modelspec.merged_from"] == "Someone's model, b, c"
    assert inherited({"modelspec.x": "1", "ss_a": "2", "sshs_b": "3", RECIPE_KEY: "{}", "weightsmith.sd_layout": "x",
                      "note": "kept"}) == {"weightsmith.sd_layout": "x", "note": "kept"}


@pytest.mark.parametrize(("arch", "lora", "details", "want"), [
    ("flux-dev", False, {}, "flux-1-dev"), ("flux-schnell", False, {}, "flux-1-schnell"), ("chroma", True, {}, "chroma/lora"),
    ("flux", True, {}, "flux-1/lora"), ("sdxl", False, {}, "stable-diffusion-xl-v1-base"),
    ("sd15", True, {}, "stable-diffusion-v1/lora"), ("qwen-image", False, {}, "qwen-image"),
    ("wan", False, {"version": "2.2"}, "wan-2.2"), ("wan", True, {"version": "2.1"}, "wan-2.1/lora"),
    ("wan", False, {"version": "2.1 or 2.2"}, "wan-2"), ("lumina2", False, {}, "lumina-2"),
    ("sd3", False, {"variant": "SD3.5 Large"}, "stable-diffusion-3-5-large"), ("unknown", False, {}, None),
])
def test_architecture_ids(arch, lora, details, want):
    assert modelspec_architecture(arch, lora, details) == want


@pytest.mark.parametrize(("variant", "want"), [("schnell", "flux-1-schnell"), ("chroma", "chroma")])
def test_detected_architecture_of_merged_flux_variants(tmp_path, variant, want):
    shapes = flux_shapes(CFG, variant)
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    write_model(a, shapes, seed=0)
    write_model(b, shapes, seed=1)
    assert main(["merge", str(a), str(b), "-o", str(out)]) == 0
    assert meta_of(out)["modelspec.architecture"] == want


def test_sd_unets_get_their_ids_and_gguf_outputs_carry_provenance(tmp_path):
    pytest.importorskip("gguf")
    from weightsmith.encodings.gguf import GGUFSource

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_sd_unet(a, "sdxl", "tiny", seed=0)
    write_sd_unet(b, "sdxl", "tiny", seed=1)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out)]) == 0
    assert meta_of(out)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta_of(out)["modelspec.resolution"] == "1024x1024"
    g = tmp_path / "m.gguf"
    assert main(["merge", str(a), str(b), "-o", str(g), "--dtype", "gguf-q8_0"]) == 0
    src = GGUFSource(g)
    meta = src.metadata
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert json.loads(meta[RECIPE_KEY])["params"]["dtype"] == "gguf-q8_0"
    start = min(t.data_offset for t in __import__("gguf").GGUFReader(str(g)).tensors)
    assert meta[HASH_KEY] == "0x" + hashlib.sha256(g.read_bytes()[start:]).hexdigest()


def test_inspect_shows_provenance(flux, capsys, tmp_path):
    for kind, want in (("merge", "architecture: flux-1-dev"), ("compose", "architecture: flux-1-dev/lora")):
        out, _, _, _ = _run(flux, kind)
        capsys.readouterr()
        js = tmp_path / f"{kind}.json"
        assert main(["inspect", str(out), "--json", str(js)]) == 0
        shown = capsys.readouterr().out
        assert "modelspec:" in shown and want in shown
        assert "recipe: weightsmith " in shown and f" {kind} (via cli)" in shown
        assert "input models[0]: a.safetensors" in shown or "input loras[0]: l1.safetensors" in shown
        assert "wsfp1:" in shown and "bytes, " in shown
        data = json.loads(js.read_text())
        assert data["provenance"]["recipe"]["operation"] == kind
        assert data["provenance"]["modelspec"]["modelspec.architecture"] == want.split(": ")[1]
    assert main(["inspect", str(flux / "a.safetensors")]) == 0
    assert "provenance: none recorded" in capsys.readouterr().out


def test_fingerprint_sees_header_size_and_sampled_data_changes(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(600_000, dtype=torch.float32)}, str(f))  # 2.4 MB: sampled, not read whole
    fp = fingerprint_file(f)
    assert fp.startswith("wsfp1:") and fp == fingerprint_file(f)
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    for pos in (8 + n, len(raw) - 1):  # the first and the last data byte are always sampled
        changed = bytearray(raw)
        changed[pos] ^= 1
        g = tmp_path / "g.safetensors"
        g.write_bytes(bytes(changed))
        assert fingerprint_file(g) != fp
    save_file({"w": torch.arange(600_000, dtype=torch.float32)}, str(f), metadata={"x": "1"})  # header only
    assert fingerprint_file(f) != fp
    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"a": torch.ones(3)}, str(shards / "m-1.safetensors"))
    save_file({"b": torch.ones(3)}, str(shards / "m-2.safetensors"))
    whole = fingerprint_input(shards)
    assert whole["size"] == sum(p.stat().st_size for p in shards.iterdir())
    shutil.copy(shards / "m-1.safetensors", shards / "m-2.safetensors")
    assert fingerprint_input(shards)["fingerprint"] != whole["fingerprint"]


# --- ComfyUI 0.3.75 loads every output; nodes record their runs ----------------------------------------


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    d = tmp_path_factory.mktemp("prov_sd15")
    for i, name in enumerate("abc"):
        write_sd15_tiny(d / f"{name}.safetensors", seed=i, dtype=torch.float16)
    return d


@pytest.mark.comfy
def test_comfy_loads_every_output(comfy, sd15):
    from comfy_support import apply_lora

    p = {n: str(sd15 / f"{n}.safetensors") for n in "abc"}
    d = sd15
    runs = {
        "merge": ["merge", p["a"], p["b"], "-o", str(d / "merge.safetensors")],
        "mix": ["mix", p["a"], p["b"], p["c"], "-o", str(d / "mix.safetensors")],
        "extract": ["extract", p["a"], p["b"], "-o", str(d / "extract.safetensors"), "--rank", "4", "--no-diff"],
        "extract_kohya": ["extract", p["a"], p["c"], "-o", str(d / "extract_kohya.safetensors"), "--rank", "2",
                          "--no-diff", "--format", "kohya"],
        "bake": ["bake", p["a"], str(d / "extract.safetensors") + ":0.7", "-o", str(d / "bake.safetensors")],
        "convert": ["convert", str(d / "extract_kohya.safetensors"), "-o", str(d / "convert.safetensors")],
        "compose": ["compose", str(d / "extract.safetensors") + ":0.5", str(d / "extract_kohya.safetensors") + ":1",
                    "-o", str(d / "compose.safetensors")],
        "rerank": ["rerank", str(d / "compose.safetensors"), "-o", str(d / "rerank.safetensors"), "--rank", "2"],
    }
    for argv in runs.values():
        assert main(argv) == 0, argv
    base = comfy.sd.load_diffusion_model(p["a"])
    for kind in ("merge", "mix", "bake"):
        path = d / f"{kind}.safetensors"
        assert meta_of(path)["modelspec.architecture"] == "stable-diffusion-v1"
        sd, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
        assert metadata[RECIPE_KEY]
        loaded = comfy.sd.load_diffusion_model(str(path))  # metadata and all, as UNETLoader loads it
        assert type(loaded.model.model_config).__name__ == "SD15"
        ours = load_file(str(path))
        got = loaded.model.diffusion_model.state_dict()
        assert all(torch.equal(got[k].to(v.dtype), v) for k, v in ours.items()), kind
    for kind in ("extract", "convert", "compose", "rerank"):
        path = d / f"{kind}.safetensors"
        meta = meta_of(path)
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_base_model_version"] == "sd_v1"
        lora_sd = comfy.utils.load_torch_file(str(path), safe_load=True)
        _, missing, refused = apply_lora(base, lora_sd)
        assert not missing and not refused, kind


@pytest.mark.comfy
def test_nodes_record_their_runs_and_load_lora_shows_provenance(comfy, flux, tmp_path, monkeypatch):
    from comfy_support import import_pack

    nodes = import_pack().NODE_CLASS_MAPPINGS
    import folder_paths

    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(flux / "l1.safetensors", loras / "l1.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], {".safetensors"}))
    folder_paths.filename_list_cache.clear()
    res = nodes["WeightsmithLoadLoRA"]().load("l1.safetensors", "auto")
    lora, text = res["result"]
    assert "architecture: flux-1-dev/lora" in text and "recipe: weightsmith" in text and " extract (via cli)" in text
    converted = nodes["WeightsmithConvertLoRA"]().convert(lora=lora, target_format="kohya", target_arch="keep")
    conv_lora = converted["result"][0] if isinstance(converted, dict) else converted[0]
    saved = nodes["WeightsmithSaveLoRA"]().save(lora=conv_lora, filename_prefix="prov/out", format="comfy", dtype="keep")
    path = saved["result"][0]
    meta = meta_of(path)
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe["operation"] == "WeightsmithSaveLoRA" and recipe["via"] == "node" and recipe["step"] == "save_lora"
    assert recipe["params"]["format"] == "comfy"
    made = recipe["params"]["lora"]["recipe"]  # the chain: Convert LoRA, made from Load LoRA of l1's file
    assert made["operation"] == "WeightsmithConvertLoRA"
    loaded = made["params"]["lora"]["recipe"]
    assert loaded["operation"] == "WeightsmithLoadLoRA"
    assert loaded["inputs"][0]["name"] == "l1.safetensors"
    assert loaded["inputs"][0]["fingerprint"] == fingerprint_file(loras / "l1.safetensors")
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta[HASH_KEY] == data_sha256(__import__("pathlib").Path(path))


@pytest.mark.comfy
def test_merge_files_node_records_its_widgets_and_files(comfy, flux, tmp_path, monkeypatch):
    import folder_paths
    from comfy_support import import_pack

    node = import_pack().NODE_CLASS_MAPPINGS["WeightsmithMergeFiles"]
    dm, out_dir = tmp_path / "diffusion_models", tmp_path / "output"
    dm.mkdir()
    out_dir.mkdir()
    for n in "ab":
        shutil.copy(flux / f"{n}.safetensors", dm / f"{n}.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(dm)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(tmp_path / "ckpt")], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(folder_paths, "output_directory", str(out_dir))
    res = node().merge("diffusion_models/a.safetensors", "diffusion_models/b.safetensors", "weighted_sum", "0.3,0.7",
                       "@single=take:A", "", "none", "take", "copy", "bf16", False, "output", "merges/m")
    path = __import__("pathlib").Path(res["result"][0])
    meta = meta_of(path)
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe["via"] == "node" and recipe["operation"] == "WeightsmithMergeFiles" and recipe["step"] == "merge"
    assert recipe["params"]["weights"] == "0.3,0.7" and recipe["params"]["dtype"] == "bf16"
    assert recipe["rules"] == ["@single=take:A"]
    assert [(i["role"], i["name"]) for i in recipe["inputs"]] == [("model_a", "a.safetensors"), ("model_b", "b.safetensors")]
    assert recipe["inputs"][1]["fingerprint"] == fingerprint_file(dm / "b.safetensors")
    assert meta["modelspec.architecture"] == "flux-1-dev" and meta["modelspec.merged_from"] == "a, b"
    assert meta[HASH_KEY] == data_sha256(path)


def test_no_hash_leaves_the_data_hash_out(flux, tmp_path, monkeypatch):
    """`weightsmith --no-hash` (and WEIGHTSMITH_HASH=0) write no modelspec.hash_sha256; everything else of the
    provenance stays, and the option is not part of the recipe (replay reproduces the tensors either way)."""
    a, b = flux / "a.safetensors", flux / "b.safetensors"
    out = tmp_path / "nohash.safetensors"
    assert main(["--no-hash", "merge", str(a), str(b), "-o", str(out)]) == 0
    meta = meta_of(out)
    assert HASH_KEY not in meta and "modelspec.architecture" in meta and '"no_hash"' not in meta["weightsmith.recipe"]
    monkeypatch.setenv("WEIGHTSMITH_HASH", "0")
    out2 = tmp_path / "env.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out2)]) == 0
    assert HASH_KEY not in meta_of(out2)
    monkeypatch.delenv("WEIGHTSMITH_HASH")
    out3 = tmp_path / "hashed.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out3)]) == 0
    assert meta_of(out3)[HASH_KEY] == data_sha256(out3)
