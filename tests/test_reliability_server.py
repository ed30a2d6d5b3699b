"""The real ComfyUI server, as a stranger on the network can drive it (what tests/test_e2e_workflows.py does
not already cover): a bad request to every Weightsmith node type fails with a node error (in /history for
values only the node can judge, in the /prompt answer for values ComfyUI validates), writes nothing
anywhere, and the same server then runs a good workflow; the server's memory returns to its baseline
after repeated large file merges (the 3072-wide demo Flux pair).

Back-to-back workflows, /interrupt and a bad prompt to a core node are in test_e2e_workflows.py.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path

import pytest
from server_support import ComfyClient, PromptRejected

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DEMO = "weightsmith_demo/"
DM = "diffusion_models/"  # the model-file pickers name the folder: diffusion_models/weightsmith_demo/…
FLUX_TINY, FLUX_TUNED = DEMO + "flux1-dev-tiny.safetensors", DEMO + "flux1-dev-tiny-tuned.safetensors"
SD15 = [DEMO + f"sd15-tiny-{t}.safetensors" for t in "abc"]
FLUX_LORA, SD15_LORA = DEMO + "flux-kohya-r8.safetensors", DEMO + "sd15-kohya-r4.safetensors"
BIG = [f"diffusion_models/{DEMO}flux1-dev-3072.safetensors", f"diffusion_models/{DEMO}flux1-schnell-3072.safetensors"]


@pytest.fixture(scope="module")
def info(comfy_server):
    return ComfyClient(comfy_server.url).object_info()


def widgets(info: dict, node: str, **given) -> dict:
    """Every widget of `node` at its default (combos at their default or first option), then `given`."""
    spec = info[node]["input"]
    out = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            options = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
            if options is not None:
                out[name] = opts.get("default", options[0] if options else None)
            elif kind in ("INT", "FLOAT", "BOOLEAN"):
                out[name] = opts.get("default", 0)
            elif kind == "STRING":
                out[name] = opts.get("default", "")
    out.update(given)
    return out


def node(info, class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": widgets(info, class_type, **inputs)}


def with_sinks(info: dict, prompt: dict) -> dict:
    """The prompt as a user builds it: an output nobody consumes goes to a Preview Any node. Only nodes that
    write files or exist to show a report are output nodes, and ComfyUI runs nothing that feeds no output."""
    out = copy.deepcopy(prompt)
    used = {v[0] for n in prompt.values() for v in n["inputs"].values() if isinstance(v, list)}
    for nid, n in prompt.items():
        if nid not in used and not info.get(n["class_type"], {}).get("output_node", True):
            out[f"sink{nid}"] = {"class_type": "PreviewAny", "inputs": {"source": [nid, 0]}}
    return out


def unet(name: str) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def lora(info, name: str, arch: str = "auto") -> dict:
    return node(info, "WeightsmithLoadLoRA", lora_name=name, arch=arch)


def runtime_failures(info) -> dict[str, tuple[dict, str]]:
    """Node type -> (a prompt that passes ComfyUI's validation but that the node must refuse, the failing node)."""
    escaped = "../../escaped_" + uuid.uuid4().hex[:6]
    return {
        # a rule that parses but matches a method's parameter that does not exist: only the run can tell
        "WeightsmithMergeModels": ({"1": unet(SD15[0]), "2": unet(SD15[1]), "3": node(
            info, "WeightsmithMergeModels", model_a=["1", 0], model_b=["2", 0], method="ties",
            ratio=0.3)}, "3"),
        "WeightsmithMergeFiles": ({"1": node(info, "WeightsmithMergeFiles", model_a="diffusion_models/" + FLUX_TINY,
                                             model_b="diffusion_models/" + FLUX_TUNED, filename_prefix=escaped)}, "1"),
        "WeightsmithLosslessMixFiles": ({"1": node(
            info, "WeightsmithLosslessMixFiles", model_a="diffusion_models/" + SD15[0], model_b="diffusion_models/" + SD15[1],
            model_c="diffusion_models/" + SD15[2], filename_prefix="/tmp/escaped")}, "1"),
        "WeightsmithExtractLoRAFiles": ({"1": node(info, "WeightsmithExtractLoRAFiles", base_model=DM + FLUX_TINY,
                                                   tuned_model=DM + SD15[0])}, "1"),
        "WeightsmithValidateLoRA": ({"1": lora(info, SD15_LORA), "2": node(
            info, "WeightsmithValidateLoRA", base_model=DM + FLUX_TINY, tuned_model=DM + FLUX_TUNED, lora=["1", 0])}, "2"),
        "WeightsmithLoadLoRA": ({"1": lora(info, FLUX_LORA, "sd15")}, "1"),
        "WeightsmithSaveLoRA": ({"1": lora(info, FLUX_LORA), "2": node(
            info, "WeightsmithSaveLoRA", lora=["1", 0], filename_prefix=escaped)}, "2"),
        "WeightsmithConvertLoRA": ({"1": lora(info, SD15_LORA), "2": node(
            info, "WeightsmithConvertLoRA", lora=["1", 0], target_arch="flux"), "3": node(
            info, "WeightsmithSaveLoRA", lora=["2", 0], filename_prefix="never")}, "2"),
        "WeightsmithFluxToChroma": ({"1": lora(info, SD15_LORA), "2": node(
            info, "WeightsmithFluxToChroma", lora=["1", 0])}, "2"),
        "WeightsmithReprojectFluxToChroma": ({"1": lora(info, SD15_LORA), "2": node(
            info, "WeightsmithReprojectFluxToChroma", lora=["1", 0], flux_model=DM + FLUX_TINY,
            chroma_model=DM + DEMO + "chroma-tiny.safetensors")}, "2"),
        "WeightsmithApplyLoRA": ({"1": unet(SD15[0]), "2": lora(info, FLUX_LORA), "3": node(
            info, "WeightsmithApplyLoRA", model=["1", 0], lora=["2", 0]), "4": {
            "class_type": "ModelSave", "inputs": {"model": ["3", 0], "filename_prefix": "never/x"}}}, "3"),
        "WeightsmithComposeLoRAs": ({"1": lora(info, FLUX_LORA), "2": lora(info, SD15_LORA), "3": node(
            info, "WeightsmithComposeLoRAs", lora_1=["1", 0], lora_2=["2", 0])}, "3"),
        "WeightsmithRerankLoRA": ({"1": lora(info, FLUX_LORA), "2": node(
            info, "WeightsmithRerankLoRA", lora=["1", 0], rank=0, energy=0.0)}, "2"),
        # an SD1.5 LoRA baked into a Flux model: refused before any work, nothing written
        "WeightsmithBakeLoRAs": ({"1": lora(info, SD15_LORA), "2": node(
            info, "WeightsmithBakeLoRAs", model="diffusion_models/" + FLUX_TINY, lora_1=["1", 0],
            filename_prefix="never/baked")}, "2"),
    }


def validation_failures(info) -> dict[str, tuple[dict, str]]:
    """Node type -> (a prompt ComfyUI must reject at POST /prompt, the node it must blame)."""
    return {
        # a rule that does not parse: refused at submit by the node's VALIDATE_INPUTS
        "WeightsmithMergeFiles_rules": ({"1": node(info, "WeightsmithMergeFiles", model_a="diffusion_models/" + FLUX_TINY,
                                                   model_b="diffusion_models/" + FLUX_TUNED,
                                                   rules="(unclosed=take:A")}, "1"),
        "WeightsmithLosslessMix": ({"1": unet(SD15[0]), "2": unet(SD15[1]), "3": unet(SD15[2]), "4": node(
            info, "WeightsmithLosslessMix", model_a=["1", 0], model_b=["2", 0], model_c=["3", 0], alpha=1e9)}, "4"),
        "WeightsmithExtractLoRA": ({"1": unet(SD15[0]), "2": unet(SD15[1]), "3": node(
            info, "WeightsmithExtractLoRA", base=["1", 0], tuned=["2", 0], rank=0)}, "3"),
        "WeightsmithMergeFiles": ({"1": node(info, "WeightsmithMergeFiles", model_a="diffusion_models/../../../etc/passwd",
                                             model_b="diffusion_models/" + FLUX_TUNED)}, "1"),
        "WeightsmithLosslessMixFiles": ({"1": node(
            info, "WeightsmithLosslessMixFiles", model_a="diffusion_models/" + SD15[0], model_b="diffusion_models/" + SD15[1],
            model_c="diffusion_models/" + SD15[2], output_folder="../../../etc")}, "1"),
        "WeightsmithLoadLoRA": ({"1": lora(info, "../../../../etc/passwd")}, "1"),
        "WeightsmithSaveLoRA": ({"1": lora(info, FLUX_LORA), "2": node(
            info, "WeightsmithSaveLoRA", lora=["1", 0], format="pickle")}, "2"),
        # a MODEL where a LORA goes, and an architecture that does not exist
        "WeightsmithLoRAToLoraModel": ({"1": unet(SD15[0]), "2": node(info, "WeightsmithLoRAToLoraModel",
                                                                      lora=["1", 0])}, "2"),
        "WeightsmithLoRAFromLoraModel": ({"1": lora(info, FLUX_LORA), "2": node(
            info, "WeightsmithLoRAToLoraModel", lora=["1", 0]), "3": node(
            info, "WeightsmithLoRAFromLoraModel", lora_model=["2", 0], arch="sd4")}, "3"),
        # an output dtype the node does not offer
        "WeightsmithSaveModel": ({"1": unet(SD15[0]), "2": node(info, "WeightsmithSaveModel", model=["1", 0],
                                                                dtype="fp4")}, "2"),
    }


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and p.suffix != ".log"}


def test_every_node_type_has_a_bad_request(info):
    ours = {n for n in info if n.startswith("Weightsmith")}
    covered = {n.split("_")[0] for n in [*runtime_failures(info), *validation_failures(info)]}
    assert ours == covered, f"node types without a bad-request case: {sorted(ours - covered)}"


def _good_prompt() -> dict:
    prompt = json.loads((ROOT / "workflows" / "api" / "compose_loras.json").read_text())
    tag = uuid.uuid4().hex[:6]
    for n in prompt.values():
        if "filename_prefix" in n["inputs"]:
            n["inputs"]["filename_prefix"] += f"_after_bad_{tag}"
    return prompt


def test_runtime_bad_requests_fail_in_history_and_the_server_goes_on(comfy_server, comfy_client, info):
    base = comfy_server.base_dir
    before = files_under(base)
    problems = []
    for node_type, (prompt, blamed) in sorted(runtime_failures(info).items()):
        prompt = with_sinks(info, prompt)
        result = comfy_client.run(prompt, timeout=120)
        err = result.error() or {}
        if result.status != "error" or err.get("node_id") != blamed:
            problems.append(f"{node_type}: status {result.status!r}, error {err}")
            continue
        assert err.get("node_type") == node_type
        message = err.get("exception_message", "")
        assert message.strip(), f"{node_type}: empty error message"
        if "filename_prefix" in prompt[blamed]["inputs"] and "never" not in prompt[blamed]["inputs"]["filename_prefix"]:
            assert "prefix" in message, f"{node_type}: {message}"
        # /history has it too (a browser reloading the page sees the failure)
        history = comfy_client.history(result.prompt_id)
        kinds = [kind for kind, _ in history["status"]["messages"]]
        assert "execution_error" in kinds, f"{node_type}: /history has no execution_error: {kinds}"
    assert not problems, "\n".join(problems)
    assert not sorted(files_under(base) - before), f"a refused request wrote files: {sorted(files_under(base) - before)}"
    assert not list(base.parent.glob("escaped*")), "a file escaped the server's folders"
    result = comfy_client.run(_good_prompt(), timeout=120)
    assert result.status == "success", result.error()


def test_validation_bad_requests_are_rejected_and_the_server_goes_on(comfy_server, comfy_client, info):
    before = files_under(comfy_server.base_dir)
    for node_type, (prompt, blamed) in sorted(validation_failures(info).items()):
        with pytest.raises(PromptRejected) as e:
            comfy_client.queue(with_sinks(info, prompt))
        errors = e.value.body.get("node_errors", {})
        assert blamed in errors, f"{node_type}: /prompt blamed {sorted(errors)} ({json.dumps(e.value.body)[:400]})"
        assert errors[blamed]["class_type"] == node_type.split("_")[0]
    assert files_under(comfy_server.base_dir) == before
    result = comfy_client.run(_good_prompt(), timeout=120)
    assert result.status == "success", result.error()


def rss_anon_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc status")


MEMORY_RUNS = 3  # after one warm-up run
MEMORY_TOLERANCE_MIB = 256  # allocator slack; a leaked copy of one input would be ~900 MiB


def test_memory_returns_to_baseline_after_large_file_merges(comfy_server, comfy_client, info):
    """Server RssAnon after a warm-up merge of the 3072-wide Flux pair (~1.9 GB of inputs), then after each of
    MEMORY_RUNS more: it must stay within MEMORY_TOLERANCE_MIB of the baseline (no tensor kept across runs)."""
    options = info["WeightsmithMergeFiles"]["input"]["required"]["model_a"]
    names = options[0] if isinstance(options[0], list) else options[1].get("options", [])
    if not all(b in names for b in BIG):
        pytest.skip("the 3072-wide demo models are not in this server's model folders")
    pid = comfy_server.proc.pid
    readings = []
    peak = 0.0

    def one_run(i: int) -> None:
        nonlocal peak
        prefix = f"memory/run{i}_{uuid.uuid4().hex[:6]}"
        prompt = {"1": node(info, "WeightsmithMergeFiles", model_a=BIG[0], model_b=BIG[1], filename_prefix=prefix)}
        comfy_client.connect()
        pid_ = comfy_client.queue(prompt)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            peak = max(peak, rss_anon_mib(pid))
            h = comfy_client.history(pid_)
            if h and h.get("status", {}).get("completed") is not None and h["status"].get("status_str"):
                break
            time.sleep(0.25)
        h = comfy_client.wait_history(pid_, timeout=30)
        assert h["status"]["status_str"] == "success", h["status"]
        for out in comfy_server.output_dir.glob(prefix + "*"):
            out.unlink()  # ~1 GB each: keep the disk clean

    one_run(0)
    time.sleep(1.0)
    baseline = rss_anon_mib(pid)
    for i in range(1, MEMORY_RUNS + 1):
        one_run(i)
        time.sleep(1.0)
        readings.append(rss_anon_mib(pid))
    print(f"server RssAnon: baseline {baseline:.0f} MiB after a warm-up merge, then {', '.join(f'{r:.0f}' for r in readings)} "
          f"MiB after each of {MEMORY_RUNS} merges; peak during merges {peak:.0f} MiB")
    assert readings[-1] - baseline < MEMORY_TOLERANCE_MIB, (baseline, readings, peak)
    assert max(readings) - baseline < 2 * MEMORY_TOLERANCE_MIB, (baseline, readings, peak)


def test_bad_prompt_payloads_do_not_break_the_server(comfy_server, comfy_client, info):
    """Garbage where a prompt belongs: each answered 400 or a node error, and the server keeps serving."""
    good = node(info, "WeightsmithLoadLoRA", lora_name=FLUX_LORA)
    for payload in ({"prompt": {"1": {"class_type": "WeightsmithLoadLoRA"}}},
                    {"prompt": {"1": {"class_type": "WeightsmithSaveLoRA", "inputs": {"lora": ["9", 0]}}}},
                    {"prompt": {"1": copy.deepcopy(good) | {"inputs": {"lora_name": None, "arch": "auto"}}}},
                    {"prompt": {"1": {"class_type": "WeightsmithLoadLoRA", "inputs": {"lora_name": "x\x00.safetensors",
                                                                                      "arch": "auto"}}}}):
        r = comfy_client.post("/prompt", payload)
        assert r.status_code == 400, (payload, r.status_code, r.text[:300])
    assert comfy_server.alive()
    assert comfy_client.get("/object_info/WeightsmithLoadLoRA").status_code == 200
