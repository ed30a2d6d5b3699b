"""End to end against the real ComfyUI server with the pack: every shipped API workflow runs green
(checked in /history, on the websocket, and in the files it writes); every UI workflow's nodes exist and
its links type-check in /object_info; a bad prompt fails cleanly and the server goes on; two prompts
queued back to back both complete; /interrupt stops a long file merge within seconds, leaving no file.

One server per session (the `comfy_server` fixture); tiny demo models except for the 3072-wide Flux pair.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import math
import time
import uuid
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image
from safetensors import safe_open
from server_support import ComfyClient, PromptRejected

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
API_FILES = sorted((ROOT / "workflows" / "api").glob("*.json"))
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
MERGE_FILES_NODE = "WeightsmithMergeFiles"
BIG_MODELS = ("weightsmith_demo/flux1-dev-3072.safetensors", "weightsmith_demo/flux1-schnell-3072.safetensors")
BIG_MARK = "-3072"
HEAVY_WORDS = ("Merge", "Extract", "Mix", "Compose", "Rerank", "Validate")  # nodes doing per-tensor work
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
# Every key of a LoRA file ComfyUI can load ends with one of these (comfy/lora.py, comfy/weight_adapter/).
LORA_SUFFIXES = (
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha", ".lora_A.weight", ".lora_B.weight",
    ".lora.up.weight", ".lora.down.weight", "_lora.up.weight", "_lora.down.weight", ".lora_linear_layer.up.weight",
    ".lora_linear_layer.down.weight", ".diff", ".diff_b", ".set_weight", ".reshape_weight", ".dora_scale",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w2",
    ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2", ".w_norm", ".b_norm", ".oft_blocks",
    ".rescale", ".lora_up.bias", ".lora_down.bias", ".lora_B.bias",
)


def _generator():
    spec = importlib.util.spec_from_file_location("ws_workflows_e2e", ROOT / "scripts" / "workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


wf = _generator()


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return ComfyClient(comfy_server.url).object_info()


# -- helpers ----------------------------------------------------------------------------------------

def output_roots(server) -> list[Path]:
    return [server.output_dir, *(server.models_dir(f) for f in ("loras", "diffusion_models", "checkpoints"))]


def snapshot(server) -> dict[Path, tuple[int, int]]:
    files = {}
    for root in output_roots(server):
        for p in root.rglob("*"):
            if p.is_file():
                st = p.stat()
                files[p] = (st.st_size, st.st_mtime_ns)
    return files


def new_files(before: dict, after: dict) -> list[Path]:
    return sorted(p for p in after if p not in before)


def with_unique_prefixes(prompt: dict, tag: str) -> dict:
    """The same workflow writing to fresh names: a changed input also defeats ComfyUI's output cache."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, str) and ("prefix" in name or name.startswith("filename")):
                node["inputs"][name] = f"{value}_{tag}"
    return out


def referenced_models(prompt: dict) -> list[str]:
    return [v for n in prompt.values() for v in n["inputs"].values()
            if isinstance(v, str) and v.endswith(".safetensors")]


def strip_prefix(key: str) -> str:
    for p in MODEL_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def check_safetensors(path: Path) -> set[str]:
    """Readable with safe_open, not empty, every tensor (or a sample of a big file) finite."""
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert keys, f"{path.name}: no tensors"
        big = path.stat().st_size > 256 * 2**20
        for k in keys[:: max(1, len(keys) // 16)] if big else keys:
            t = f.get_tensor(k)
            assert t.float().isfinite().all(), f"{path.name}: {k} has NaN/Inf"
    return set(keys)


def numbers_in(data) -> list[float]:
    if isinstance(data, bool):
        return []
    if isinstance(data, (int, float)):
        return [float(data)]
    if isinstance(data, dict):
        return [x for v in data.values() for x in numbers_in(v)]
    if isinstance(data, list):
        return [x for v in data for x in numbers_in(v)]
    return []


def strict_json(text: str, where: str):
    """The report data as the browser's JSON.parse sees it: NaN/Infinity are not JSON (use null)."""

    def reject(constant):
        raise AssertionError(f"{where}: report data holds {constant}, which is not JSON (the web extension's "
                             f"JSON.parse rejects it); write null for a value not computed:\n{text[:600]}")

    return json.loads(text, parse_constant=reject)


PATH_KEYS = ("path", "output", "out", "file", "written")  # report fields naming a file the node wrote


def paths_in(data) -> list[str]:
    if isinstance(data, dict):
        return [p for k, v in data.items()
                for p in ([v] if k in PATH_KEYS and isinstance(v, str) else paths_in(v))]
    if isinstance(data, list):
        return [p for v in data for p in paths_in(v)]
    return []


def report_data(result, node_id: str) -> dict:
    raw = result.outputs.get(node_id, {}).get("weightsmith_json")
    return json.loads(raw[0]) if raw else {}


def lora_modules(path: Path) -> dict[str, int]:
    """Module prefix -> rank, from the down/A matrices of a LoRA file (any of the common namings)."""
    ranks = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            for suffix in (".lora_down.weight", ".lora_A.weight", ".lora.down.weight"):
                if k.endswith(suffix):
                    ranks[k[: -len(suffix)]] = f.get_slice(k).get_shape()[0]
    return ranks


def describe_failure(result) -> str:
    err = result.error() or {}
    tb = "".join(err.get("traceback", [])[-6:]) if isinstance(err.get("traceback"), list) else ""
    return (f"status {result.status!r}; node {err.get('node_id')} ({err.get('node_type')}): "
            f"{err.get('exception_type')}: {err.get('exception_message')}\n{tb}")


def model_roots(server) -> list[Path]:
    """Where model combos resolve: the temp model folders, then a models cache listed after them."""
    roots = [server.base_dir / "models"]
    for line in (server.base_dir / "extra_model_paths.yaml").read_text().splitlines():
        if line.strip().startswith("base_path:") and str(server.base_dir) not in line:
            roots.append(Path(line.split(":", 1)[1].strip()))
    return roots


def model_files_by_name(server, prompt: dict) -> dict[str, Path]:
    """Combo values naming model files (`weightsmith_demo/x.safetensors` or `diffusion_models/weightsmith_demo/…`)."""
    found = {}
    for name in referenced_models(prompt):
        for root in model_roots(server):
            for cand in (root / name, *(root / f / name for f in ("diffusion_models", "checkpoints", "loras"))):
                if cand.is_file():
                    found[name] = cand
                    break
            if name in found:
                break
    return found


def check_outputs(server, prompt: dict, result, info: dict, written: list[Path]) -> None:
    """Reports shown, progress reported, and every written file loadable with the keys it should have."""
    ws_nodes = {nid for nid, n in prompt.items() if n["class_type"].startswith("Weightsmith")}
    reporters = {nid for nid in ws_nodes if info[prompt[nid]["class_type"]].get("output_node")}
    for nid in reporters:
        ui = result.outputs.get(nid, {})
        reports = ui.get("weightsmith_report")
        assert reports and isinstance(reports[0], str) and reports[0].strip(), \
            f"node {nid} ({prompt[nid]['class_type']}) returned no report in its ui output: {sorted(ui)}"
        assert any(c.isdigit() for c in reports[0]), f"node {nid}: report has no numbers:\n{reports[0]}"
        if "weightsmith_json" in ui:
            data = strict_json(ui["weightsmith_json"][0], f"node {nid} ({prompt[nid]['class_type']})")
            for value in paths_in(data):  # a file the report names was really written (and kept)
                if str(server.base_dir) in value:
                    assert Path(value) in written, f"node {nid}: report names {value}, which this run did not write"
    if reporters:
        assert any(numbers_in(report_data(result, n)) for n in reporters), "no report carries any number"
    progressed = {m["node"] for m in result.of_type("progress")}
    cached = {n for m in result.of_type("execution_cached") for n in m.get("nodes", [])}  # did not run again
    heavy = {nid for nid in ws_nodes - cached if any(w in prompt[nid]["class_type"] for w in HEAVY_WORDS)}
    assert not heavy or progressed & heavy, (
        f"no progress message on the websocket from {', '.join(prompt[n]['class_type'] for n in sorted(heavy))}")
    for nid in progressed & ws_nodes:
        value, maximum = result.progress(nid)[-1]
        assert 0 < maximum and value == maximum, f"node {nid}: its last progress is {value}/{maximum}, not complete"

    for nid, ui in result.outputs.items():  # charts previewed or saved: fetch them as the frontend does
        for img in ui.get("images", []):
            r = requests.get(server.url + "/view", params={k: img[k] for k in ("filename", "subfolder", "type")},
                             timeout=30)
            assert r.status_code == 200, f"node {nid}: /view of {img} answered {r.status_code}"
            with Image.open(io.BytesIO(r.content)) as im:
                assert im.size[0] > 16 and im.size[1] > 16, f"node {nid}: {img['filename']} is {im.size}"

    inputs = model_files_by_name(server, prompt)
    input_keys = {name: {strip_prefix(k) for k in safetensors_keys(p)} for name, p in inputs.items()
                  if "loras" not in p.parts}
    for path in written:
        assert not path.name.startswith(".") and ".tmp" not in path.name, f"temp file left behind: {path}"
        if path.suffix == ".safetensors":
            keys = check_safetensors(path)
            folder = path.relative_to(server.base_dir).parts
            is_lora = "loras" in folder or all(k.endswith(LORA_SUFFIXES) for k in keys)
            if is_lora:
                odd = sorted(k for k in keys if not k.endswith(LORA_SUFFIXES))
                assert not odd, f"{path.name}: keys ComfyUI's LoRA loader does not know: {odd[:5]}"
            else:  # a model (in diffusion_models/, checkpoints/ or output/): the layout of one of its inputs
                stripped = {strip_prefix(k) for k in keys}
                if input_keys:
                    assert any(stripped == ks for ks in input_keys.values()), (
                        f"{path.name}: its {len(stripped)} keys match none of the input models "
                        f"({', '.join(f'{n}: {len(k)}' for n, k in input_keys.items())})")
        elif path.suffix == ".png":
            with Image.open(path) as im:
                assert im.size[0] > 16 and im.size[1] > 16


# -- what each shipped workflow must produce, beyond the generic checks -------------------------------

def _written_named(written: list[Path], prefix: str) -> Path:
    """The one file written under a filename_prefix (its stem is the prefix plus ComfyUI's counter)."""
    stem = prefix.rsplit("/", 1)[-1]
    hits = [p for p in written if p.name.startswith(stem + "_") and p.name[len(stem) + 1:][:5].isdigit()]
    assert len(hits) == 1, f"expected one file for prefix {prefix!r}, found {[p.name for p in hits]}"
    return hits[0]


def expect_compose_loras(prompt, result, written):
    exact, reranked = report_data(result, "3"), report_data(result, "5")
    composed = lora_modules(_written_named(written, prompt["4"]["inputs"]["filename_prefix"]))
    r8 = lora_modules(_written_named(written, prompt["6"]["inputs"]["filename_prefix"]))
    # The exact composition stacks the inputs' ranks; the files hold what the reports say.
    assert exact["modules"] == len(composed) and exact["rank_max"] == max(composed.values())
    assert exact["max_rel_error"] == 0.0
    assert reranked["rank_max"] == max(r8.values()) == prompt["5"]["inputs"]["rank"]
    assert reranked["modules"] == len(r8) == len(composed)
    assert 0 < reranked["max_rel_error"] < 1 and math.isfinite(reranked["total_rel_error"])


def _tensors(path: Path, keys: list[str]) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).float() for k in keys}


def expect_lossless_mix(prompt, result, written, server):
    files = model_files_by_name(server, prompt)
    a, b, c = (files[prompt["1"]["inputs"][m]] for m in ("model_a", "model_b", "model_c"))
    out = _written_named(written, prompt["1"]["inputs"]["filename_prefix"])
    rep = report_data(result, "1")
    keys = sorted(safetensors_keys(out))
    assert rep["keys_mixed"] == len(keys) and set(keys) == safetensors_keys(a)
    unet = next(g for g in rep["groups"] if g["group"] == "unet")
    assert abs(unet["from b"] + unet["from c"] - 1) < 1e-6 and 0 < unet["from b"] < 1
    # Lossless: every element written is b's or c's, and (min_diff) the one nearest to a.
    sample = keys[:: max(1, len(keys) // 8)]
    ta, tb, tc, to = (_tensors(p, sample) for p in (a, b, c, out))
    for k in sample:
        assert ((to[k] == tb[k]) | (to[k] == tc[k])).all(), f"{k}: elements that are neither b's nor c's"
        nearest = torch.minimum((ta[k] - tb[k]).abs(), (ta[k] - tc[k]).abs())
        assert ((ta[k] - to[k]).abs() <= nearest).all(), f"{k}: an element is not the one nearest to a"
    # The second node is a dry run: a report, and no file.
    dry = report_data(result, "3")
    assert dry["dry_run"] is True and dry["output"] is None and dry["keys_mixed"] == len(keys)
    stem = prompt["3"]["inputs"]["filename_prefix"].rsplit("/", 1)[-1]
    assert not [p for p in written if p.name.startswith(stem)], "the dry run wrote a file"


def expect_lossless_mix_reference_recipe(prompt, result, written, server):
    rep = report_data(result, "4")
    saved = _written_named(written, prompt["5"]["inputs"]["filename_prefix"])
    assert rep["keys_mixed"] == len(safetensors_keys(saved)) > 0
    unet = next(g for g in rep["groups"] if g["group"] == "unet")
    assert abs(unet["from b"] + unet["from c"] - 1) < 1e-6
    # the recipe does what it says: the values decide (a real split), not ties
    assert 0.05 < unet["from b"] < 0.95 and not rep["tie_warning"], (unet, rep["tie_warning"])


def expect_convert_flux_lora_to_chroma(prompt, result, written, server):
    from weightsmith.lora.formats import load_lora, lora_summary
    from weightsmith.testmodels import FluxConfig, flux_diffusers_shapes, flux_shapes

    converted, renamed = (report_data(result, n) for n in ("2", "4"))
    # Read LoRA File is not an output node: when an earlier workflow read the same file, ComfyUI reuses its
    # cached result and sends no report for it; the file itself says what was loaded.
    lora_file = model_roots(server)[-1] / "loras" / prompt["1"]["inputs"]["lora_name"]
    if not lora_file.is_file():
        lora_file = server.models_dir("loras") / prompt["1"]["inputs"]["lora_name"]
    loaded = report_data(result, "1") or lora_summary(load_lora(lora_file))
    assert converted["source_arch"] == "flux" and converted["target_arch"] == "chroma"
    assert converted["applied"] + converted["dropped"] + converted["unknown"] == loaded["modules"]
    assert renamed["dropped"] == 0 and renamed["applied"] == converted["applied"]
    # Every module of the saved kohya file names a real Chroma layer (kohya: lora_unet_ + BFL name with _).
    chroma = {"lora_unet_" + k[: -len(".weight")].replace(".", "_")
              for k in flux_shapes(FluxConfig(), "chroma") if k.endswith(".weight")}
    kohya = lora_modules(_written_named(written, prompt["3"]["inputs"]["filename_prefix"]))
    assert len(kohya) == converted["applied"] and set(kohya) <= chroma, sorted(set(kohya) - chroma)[:5]
    assert set(kohya.values()) == {loaded["rank_max"]}  # kept unchanged: same ranks
    # The diffusers file names diffusers layers, none of them a modulation (Chroma has none to receive it).
    layers = {k[: -len(".weight")] for k in flux_diffusers_shapes(FluxConfig()) if k.endswith(".weight")}
    diffusers = {m.removeprefix("transformer.") for m in
                 lora_modules(_written_named(written, prompt["5"]["inputs"]["filename_prefix"]))}
    assert diffusers and diffusers <= layers, sorted(diffusers - layers)[:5]
    assert not [m for m in diffusers if "norm" in m or m.startswith("time_text_embed")]


def lora_module_names(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k[: -len(sfx)] for k in f.keys() for sfx in LORA_SUFFIXES if k.endswith(sfx)}


def expect_extract_and_validate_lora(prompt, result, written, server):
    extracted, validated = report_data(result, "1")["summary"], report_data(result, "4")["summary"]
    base = model_files_by_name(server, prompt)[prompt["1"]["inputs"]["base_model"]]
    n_tensors = len(safetensors_keys(base))
    rank = prompt["1"]["inputs"]["rank"]
    assert extracted["changed"] == extracted["covered"] == n_tensors  # the demo fine-tune changes every tensor
    assert extracted["rank_max"] == rank and extracted["spurious"] == 0 and extracted["missing"] == 0
    assert 0 < extracted["error_global"] < 0.1 and 1.0 <= extracted["ratio_to_optimal"] < 1.1
    # Validating the LoRA against the two models independently finds the error the extraction reported.
    assert validated["covered"] == n_tensors and validated["orphan_modules"] == 0
    assert math.isclose(validated["error_global"], extracted["error_global"], rel_tol=1e-3)
    saved = _written_named(written, prompt["2"]["inputs"]["filename_prefix"])
    assert max(lora_modules(saved).values()) == rank
    assert f"{len(lora_module_names(saved))} modules" in result.outputs["2"]["weightsmith_report"][0]


def _close(x, y, what: str, rel: float = 1e-2) -> None:
    """Equal up to one rounding of a 16-bit float (the files are bf16/fp16)."""
    tol = rel * max(float(y.abs().max()), 1e-6)
    assert float((x - y).abs().max()) <= tol, f"{what}: off by {float((x - y).abs().max()):.3g} (tol {tol:.3g})"


def expect_merge_flux_guidance_preset(prompt, result, written, server):
    files = model_files_by_name(server, prompt)
    dev, schnell = files[prompt["1"]["inputs"]["model_a"]], files[prompt["1"]["inputs"]["model_b"]]
    out = _written_named(written, prompt["1"]["inputs"]["filename_prefix"])
    rep = report_data(result, "1")
    keys = safetensors_keys(out)
    guidance = sorted(k for k in keys if k.startswith("guidance_in."))
    assert keys == safetensors_keys(dev) and guidance, "the merge must still be a Flux dev (guidance_in kept)"
    assert rep["keys"] == {"merged": len(keys) - len(guidance), "taken": len(guidance), "dropped": 0}
    shared = sorted(keys - set(guidance))[:: 6]
    ta, to = _tensors(dev, shared + guidance), _tensors(out, shared + guidance)
    tb = _tensors(schnell, shared)
    for k in shared:
        _close(to[k], 0.5 * ta[k] + 0.5 * tb[k], k)
    for k in guidance:
        assert torch.equal(to[k], ta[k]), f"{k}: not dev's guidance embedder"
    dry = report_data(result, "3")
    assert dry["dry_run"] is True and dry["output"] is None and dry["keys"]["dropped"] == len(guidance)
    stem = prompt["3"]["inputs"]["filename_prefix"].rsplit("/", 1)[-1]
    assert not [p for p in written if p.name.startswith(stem)], "the dry run wrote a file"


def expect_merge_models_block_weights(prompt, result, written, server):
    """The rules in the workflow: input blocks 0.8/0.2, middle 0.5/0.5, output blocks 0.2/0.8, time from A."""
    files = model_files_by_name(server, prompt)
    a, b = files[prompt["1"]["inputs"]["unet_name"]], files[prompt["2"]["inputs"]["unet_name"]]
    out = _written_named(written, prompt["5"]["inputs"]["filename_prefix"])
    with safe_open(str(out), "pt") as f:
        saved = {strip_prefix(k): k for k in f.keys()}
    expected = {"input_blocks.": (0.8, 0.2), "middle_block.": (0.5, 0.5), "output_blocks.": (0.2, 0.8),
                "time_embed.": (1.0, 0.0)}
    checked = 0
    for group, (wa, wb) in expected.items():
        keys = sorted(k for k in saved if k.startswith(group) and k.endswith(".weight"))[:3]
        if not keys:  # the tiny demo UNet has no middle block
            continue
        checked += 1
        ta, tb = _tensors(a, keys), _tensors(b, keys)
        with safe_open(str(out), "pt") as f:
            for k in keys:
                _close(f.get_tensor(saved[k]).float(), wa * ta[k] + wb * tb[k], f"{k} ({wa}·A + {wb}·B)")
    assert checked >= 3, f"{out.name}: too few of the rule groups found to check"


def expect_wan22_expert_pair_extract_loras(prompt, result, written, server):
    """One operation on both experts: a LoRA per expert, each at the rank asked, covering every changed layer."""
    files = model_files_by_name(server, prompt)
    for extract, save in (("1", "2"), ("3", "4")):
        rep = report_data(result, extract)["summary"]
        n_tensors = len(safetensors_keys(files[prompt[extract]["inputs"]["base_model"]]))
        assert rep["changed"] == rep["covered"] == n_tensors and rep["missing"] == 0, rep
        saved = _written_named(written, prompt[save]["inputs"]["filename_prefix"])
        assert max(lora_modules(saved).values()) == prompt[extract]["inputs"]["rank"]
    high, low = (files[prompt[n]["inputs"]["base_model"]] for n in ("1", "3"))
    assert high != low and "high" in high.name and "low" in low.name


EXPECT = {
    "compose_loras": lambda prompt, result, written, server: expect_compose_loras(prompt, result, written),
    "convert_flux_lora_to_chroma": expect_convert_flux_lora_to_chroma,
    "extract_and_validate_lora": expect_extract_and_validate_lora,
    "lossless_mix": expect_lossless_mix,
    "merge_flux_guidance_preset": expect_merge_flux_guidance_preset,
    "merge_models_block_weights": expect_merge_models_block_weights,
    "lossless_mix_reference_recipe": expect_lossless_mix_reference_recipe,
    "wan22_expert_pair_extract_loras": expect_wan22_expert_pair_extract_loras,
}


# -- every shipped API workflow ----------------------------------------------------------------------

@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_workflow_runs_green(path, comfy_server, comfy_client, object_info):
    prompt = json.loads(path.read_text())
    missing = sorted({n["class_type"] for n in prompt.values()} - set(object_info))
    assert not missing, f"{path.name}: node types the server does not know: {missing}"
    before = snapshot(comfy_server)
    timeout = 300 if any(BIG_MARK in m for m in referenced_models(prompt)) else 120
    # A cold cache, as on a user's first run: a node that feeds an output but is not one itself (Compose,
    # Extract, Read LoRA File) sends its report only when it runs, not when an earlier prompt's result is reused.
    comfy_client.post("/free", {"unload_models": False, "free_memory": True}).raise_for_status()
    time.sleep(0.5)  # the worker wakes on the flag and resets its caches before it takes the next prompt
    result = comfy_client.run(prompt, timeout=timeout)
    assert result.status == "success", describe_failure(result)
    written = new_files(before, snapshot(comfy_server))
    check_outputs(comfy_server, prompt, result, object_info, written)
    if path.stem in EXPECT:
        EXPECT[path.stem](prompt, result, written, comfy_server)


# -- every shipped UI workflow against the live node definitions --------------------------------------

def _accepts(input_type: str, link_type: str) -> bool:
    if "*" in (input_type, link_type):
        return True
    return bool(set(input_type.split(",")) & set(link_type.split(",")))


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_nodes_exist_and_links_type_check(path, object_info):
    ui = json.loads(path.read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    unknown = sorted({n["type"] for n in ui["nodes"]} - set(object_info) - set(wf.VIRTUAL_TYPES))
    assert not unknown, f"{path.name}: node types missing from /object_info: {unknown}"
    for link_id, src, src_slot, dst, dst_slot, ltype in ui["links"]:
        src_def, dst_def = object_info[nodes[src]["type"]], object_info[nodes[dst]["type"]]
        assert src_slot < len(src_def["output"]), f"{path.name}: link {link_id} from missing output {src_slot}"
        out_type = src_def["output"][src_slot]
        in_name = nodes[dst]["inputs"][dst_slot]["name"]
        specs = {name: kind for name, kind, _, _ in wf.input_specs(dst_def)}
        assert in_name in specs, f"{path.name}: node {dst} ({nodes[dst]['type']}) has no input {in_name!r}"
        assert out_type == ltype, f"{path.name}: link {link_id} says {ltype}, node {src} output {src_slot} is {out_type}"
        assert _accepts(specs[in_name], out_type), (
            f"{path.name}: link {link_id} carries {out_type} into {nodes[dst]['type']}.{in_name} ({specs[in_name]})")


def test_ui_workflows_are_generated_from_their_api_twins(object_info):
    """`python scripts/workflows.py --check` against the live server: committed UI files are up to date."""
    if not API_FILES:
        pytest.skip("no API workflows shipped yet")
    problems = wf.generate(object_info, check=True)
    assert not problems, "stale UI workflows; run `python scripts/workflows.py`:\n" + "\n".join(problems)


def test_templates_are_served(comfy_client):
    templates = comfy_client.get("/api/workflow_templates").json()
    if not UI_FILES:
        pytest.skip("no UI workflows shipped yet")
    pack = next((k for k in templates if k.lower().startswith("weightsmith")), None)
    assert pack, f"ComfyUI lists no templates for the pack: {templates}"
    assert sorted(templates[pack]) == sorted(p.stem for p in UI_FILES)
    first = UI_FILES[0]
    served = comfy_client.get(f"/api/workflow_templates/{pack}/{first.name}").json()
    assert served == json.loads(first.read_text())


def test_web_extension_is_served(comfy_client):
    scripts = comfy_client.get("/extensions").json()
    ours = [s for s in scripts if s.endswith("/weightsmith.js")]
    assert ours, "weightsmith.js not among /extensions"
    assert "registerExtension" in comfy_client.get(ours[0]).text


# -- failure, queueing, interrupt ---------------------------------------------------------------------

def test_bad_prompts_fail_cleanly_and_the_server_goes_on(comfy_server, comfy_client, object_info):
    # Rejected at submit: a model file that is not there (ComfyUI checks combos against the live list).
    bad_combo = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "weightsmith_demo/nope.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "ModelSave", "inputs": {"model": ["1", 0], "filename_prefix": "diffusion_models/never"}},
    }
    with pytest.raises(PromptRejected) as exc:
        comfy_client.queue(bad_combo)
    assert "1" in exc.value.body.get("node_errors", {}), exc.value.body
    # Accepted, then fails while running: a hidden-64 Flux file is not a model ComfyUI can detect.
    before = snapshot(comfy_server)
    bad_run = copy.deepcopy(bad_combo)
    bad_run["1"]["inputs"]["unet_name"] = "weightsmith_demo/flux1-dev-tiny.safetensors"
    result = comfy_client.run(bad_run, timeout=60)
    assert result.status == "error"
    err = result.error()
    assert err and err["node_id"] == "1" and err["exception_message"], err
    assert new_files(before, snapshot(comfy_server)) == []
    # The same server then runs a good workflow.
    good = _small_workflows()
    if not good:
        pytest.skip("no small shipped workflow to run after the failure")
    prompt = with_unique_prefixes(json.loads(good[0].read_text()), "after_error")
    result = comfy_client.run(prompt, timeout=120)
    assert result.status == "success", describe_failure(result)


def _small_workflows() -> list[Path]:
    return [p for p in API_FILES if not any(BIG_MARK in m for m in referenced_models(json.loads(p.read_text())))]


def test_two_workflows_queued_back_to_back_both_complete(comfy_server, comfy_client):
    small = _small_workflows()
    if not small:
        pytest.skip("no small shipped workflow yet")
    picks = (small * 2)[:2] if len(small) < 2 else small[:2]
    comfy_client.connect()
    tag = uuid.uuid4().hex[:6]
    prompts = [with_unique_prefixes(json.loads(p.read_text()), f"b2b{i}_{tag}") for i, p in enumerate(picks)]
    ids = [comfy_client.queue(p) for p in prompts]
    results = comfy_client.wait(ids, timeout=240)
    for p, pid in zip(picks, ids):
        assert results[pid].status == "success", f"{p.stem}: {describe_failure(results[pid])}"
    assert comfy_client.queue_state()["queue_running"] == []


def merge_files_prompt(info: dict, prefix: str) -> dict | None:
    """A one-node prompt merging the two 3072-wide Flux files with WeightsmithMergeFiles' defaults."""
    node_def = info.get(MERGE_FILES_NODE)
    if node_def is None:
        return None
    models = list(BIG_MODELS)
    inputs = {}
    for name, kind, opts, required in wf.input_specs(node_def):
        spec = wf.raw_spec(node_def, name)
        options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        match = [o for o in options if isinstance(o, str) and models and o.endswith(models[0])]
        if kind == "COMBO" and match:
            inputs[name] = match[0]
            models.pop(0)
        elif wf.is_widget(kind, opts):
            inputs[name] = prefix if "prefix" in name else wf.default_value(kind, opts, spec)
        elif required:
            return None
    if models:
        return None
    return {"1": {"class_type": MERGE_FILES_NODE, "inputs": inputs}}


def test_interrupt_stops_a_long_file_merge_and_leaves_no_file(comfy_server, comfy_client, object_info):
    prompt = merge_files_prompt(object_info, f"interrupted_{uuid.uuid4().hex[:6]}")
    if prompt is None:
        pytest.skip(f"{MERGE_FILES_NODE} is not available (or not buildable from its defaults) yet")
    before = snapshot(comfy_server)
    comfy_client.connect()
    pid = comfy_client.queue(prompt)
    t_interrupt = None
    ended = None
    for msg in comfy_client.messages(timeout=180):
        data = msg.get("data") or {}
        if data.get("prompt_id") != pid:
            continue
        if msg["type"] == "progress" and t_interrupt is None and data["value"] < data["max"]:
            comfy_client.interrupt(pid)
            t_interrupt = time.monotonic()
        if msg["type"] in ("execution_interrupted", "execution_error", "execution_success"):
            ended = msg["type"]
            if ended == "execution_error":
                ended += f": {data.get('exception_type')}: {data.get('exception_message')}"
            break
    assert t_interrupt is not None, "the merge reported no progress before it ended"
    stopped_after = time.monotonic() - t_interrupt
    assert ended == "execution_interrupted", f"merge ended with {ended}, not interrupted"
    assert stopped_after < 5.0, f"interrupt took {stopped_after:.1f}s"
    history = comfy_client.wait_history(pid, timeout=30)
    assert history["status"]["status_str"] == "error"
    time.sleep(0.5)  # let any cleanup on the worker thread finish before looking at the folders
    assert new_files(before, snapshot(comfy_server)) == [], "the interrupted merge left files behind"


# -- last: the server log -------------------------------------------------------------------------------

def test_server_log_has_no_problems(comfy_server):
    """Runs after the workflows above: ComfyUI only logs these, so the log is where they show."""
    assert comfy_server.alive(), "the server died"
    problems = comfy_server.log_problems()
    assert not problems, "server log:\n" + "\n".join(problems[:20])
