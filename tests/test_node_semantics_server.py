"""Node semantics against the real ComfyUI server (issue 21 item 1, and the server half of items 4, 5 and 10):
only nodes that write files or exist to show a report are output nodes, so a bad value anywhere in a
branch makes ComfyUI reject the prompt at POST /prompt with node_errors — before anything runs — exactly
as it does for its own nodes; the ratio widget can be driven by a primitive; the templates are served
with their thumbnails.
"""

from __future__ import annotations

import json
import uuid

import pytest
import requests
from server_support import ComfyClient, PromptRejected

pytestmark = pytest.mark.e2e

DEMO = "weightsmith_demo/"
FLUX_LORA = DEMO + "flux-kohya-r8.safetensors"
SD15 = [f"diffusion_models/{DEMO}sd15-tiny-{t}.safetensors" for t in "ab"]
# The nodes that write a file, or whose purpose is the report they show (Validate LoRA).
OUTPUT_NODES = {"WeightsmithMergeFiles", "WeightsmithLosslessMixFiles", "WeightsmithBakeLoRAs", "WeightsmithSaveLoRA",
                "WeightsmithSaveModel", "WeightsmithValidateLoRA"}


@pytest.fixture(scope="module")
def info(comfy_server):
    return ComfyClient(comfy_server.url).object_info()


def read_lora(name: str = FLUX_LORA) -> dict:
    return {"class_type": "WeightsmithLoadLoRA", "inputs": {"lora_name": name, "arch": "auto"}}


def save_lora(src: str, prefix: str) -> dict:
    return {"class_type": "WeightsmithSaveLoRA",
            "inputs": {"lora": [src, 0], "filename_prefix": prefix, "format": "comfy", "dtype": "keep"}}


def compose(strength: float) -> dict:
    inputs = {f"strength_{i}": 1.0 for i in range(1, 5)}
    inputs.update(strength_1=strength, rank=0, energy=0.0, lora_1=["1", 0])
    return {"class_type": "WeightsmithComposeLoRAs", "inputs": inputs}


def test_only_file_writers_and_report_nodes_are_output_nodes(info):
    ours = {name: d["output_node"] for name, d in info.items() if name.startswith("Weightsmith")}
    assert {n for n, out in ours.items() if out} == OUTPUT_NODES
    assert info["WeightsmithLoadLoRA"]["display_name"] != info["LoraLoader"]["display_name"]


def _bad_prompts(tag: str) -> dict[str, tuple[dict, str, str]]:
    """name -> (prompt, the node ComfyUI must blame, the validation error type)."""
    return {
        "compose strength 50": ({"1": read_lora(), "2": compose(50.0), "3": save_lora("2", f"never/c_{tag}")},
                                "2", "value_bigger_than_max"),
        "rerank rank 5000": ({"1": read_lora(), "2": {"class_type": "WeightsmithRerankLoRA", "inputs": {
            "lora": ["1", 0], "rank": 5000, "energy": 0.0}}, "3": save_lora("2", f"never/r_{tag}")},
            "2", "value_bigger_than_max"),
        "missing LoRA name": ({"1": read_lora(DEMO + "no-such-lora.safetensors"), "2": save_lora("1", f"never/m_{tag}")},
                              "1", "value_not_in_list"),
        "apply strength 500": ({"1": {"class_type": "UNETLoader", "inputs": {"unet_name": SD15[0][len("diffusion_models/"):],
                                                                           "weight_dtype": "default"}},
                                "2": read_lora(), "3": {"class_type": "WeightsmithApplyLoRA", "inputs": {
                                    "model": ["1", 0], "lora": ["2", 0], "strength": 500.0}},
                                "4": {"class_type": "ModelSave", "inputs": {"model": ["3", 0],
                                                                           "filename_prefix": f"never/a_{tag}"}}},
                               "3", "value_bigger_than_max"),
    }


def test_bad_values_are_rejected_at_submit_before_anything_runs(comfy_server, comfy_client, info):
    tag = uuid.uuid4().hex[:6]
    history_before = set(comfy_client.get("/history").json())
    for what, (prompt, blamed, kind) in _bad_prompts(tag).items():
        with pytest.raises(PromptRejected) as e:
            comfy_client.queue(prompt)
        body = e.value.body
        assert e.value.status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation", (what, body)
        errors = body["node_errors"]
        assert blamed in errors and errors[blamed]["class_type"] == prompt[blamed]["class_type"], (what, errors)
        assert kind in [r["type"] for r in errors[blamed]["errors"]], (what, errors[blamed])
    # nothing was queued, nothing ran, nothing was written
    assert set(comfy_client.get("/history").json()) == history_before
    assert comfy_client.queue_state()["queue_pending"] == []
    assert not [p for p in comfy_server.base_dir.rglob(f"*{tag}*")]


def test_a_bad_branch_is_reported_like_a_core_nodes_and_never_runs(comfy_server, comfy_client):
    """Next to a valid branch, ComfyUI runs the valid one and reports the bad node in node_errors (its own
    nodes behave so); before, the bad branch's Load LoRA still ran as an output of its own."""
    tag = uuid.uuid4().hex[:6]
    prompt = {"1": read_lora(), "2": compose(50.0), "3": save_lora("2", f"never/bad_{tag}"),
              "4": save_lora("1", f"weightsmith/good_{tag}")}
    comfy_client.connect()  # before queueing: no message of this prompt is missed
    r = comfy_client.post("/prompt", {"prompt": prompt, "client_id": comfy_client.client_id})
    body = r.json()
    assert r.status_code == 200 and "2" in body["node_errors"], body
    result = comfy_client.wait([body["prompt_id"]], timeout=120)[body["prompt_id"]]
    assert result.status == "success"
    ran = {m["node"] for m in result.of_type("executing") if m.get("node")}
    assert ran == {"1", "4"} and set(result.outputs) == {"1", "4"}, ran  # the compose and its save never ran
    assert not list(comfy_server.base_dir.rglob(f"bad_{tag}*"))


def test_ratio_is_driven_by_a_primitive(comfy_client):
    prompt = {
        "p": {"class_type": "PrimitiveFloat", "inputs": {"value": 0.25}},
        "1": {"class_type": "WeightsmithMergeFiles", "inputs": {
            "model_a": SD15[0], "model_b": SD15[1], "method": "weighted_sum", "ratio": ["p", 0], "weights": "",
            "rules": "", "params": "", "preset": "none", "missing": "take", "other_keys": "copy", "dtype": "keep",
            "dry_run": True, "output_folder": "diffusion_models", "filename_prefix": f"never/ratio_{uuid.uuid4().hex[:6]}",
            "model_c": "none", "model_d": "none"}},
    }
    result = comfy_client.run(prompt, timeout=120)
    assert result.status == "success", result.error()
    data = json.loads(result.outputs["1"]["weightsmith_json"][0])
    assert data["plan"]["weights"] == pytest.approx([0.25, 0.75])


def test_failed_node_error_names_a_type_that_is_not_a_path(comfy_client):
    # a method parameter that does not exist: refused while running (only the node can judge it)
    prompt = {"3": {"class_type": "WeightsmithMergeFiles", "inputs": {
        "model_a": SD15[0], "model_b": SD15[1], "method": "weighted_sum", "ratio": 0.5, "weights": "",
        "rules": "", "params": "nonsense=1", "preset": "none", "missing": "take", "other_keys": "copy",
        "dtype": "keep", "dry_run": True, "output_folder": "diffusion_models",
        "filename_prefix": "never/x", "model_c": "none", "model_d": "none"}}}
    result = comfy_client.run(prompt, timeout=120)
    err = result.error()
    assert result.status == "error" and err["node_id"] == "3", err
    assert "/" not in err["exception_type"] and err["exception_type"].startswith("weightsmith"), err["exception_type"]


def test_templates_are_served_with_their_thumbnails(comfy_client):
    templates = comfy_client.get("/api/workflow_templates").json()
    pack = next(k for k in templates if k.lower().startswith("weightsmith"))
    names = templates[pack]
    assert names and all(" " in n for n in names), names  # titles a user reads, not file stems
    for name in names:  # what frontend 1.32.9 fetches for a custom node's template: <name>.json and <name>.jpg
        wf = requests.get(f"{comfy_client.url}/api/workflow_templates/{pack}/{name}.json", timeout=30)
        assert wf.status_code == 200 and wf.json()["nodes"], name
        thumb = requests.get(f"{comfy_client.url}/api/workflow_templates/{pack}/{name}.jpg", timeout=30)
        assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff", name
