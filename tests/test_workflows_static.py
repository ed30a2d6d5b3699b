"""The shipped workflows without a server: every API workflow is well-formed, has its UI twin (and the
other way round), and each UI twin is internally consistent and says the same as its API twin.
Plus unit tests of the API→UI generator (scripts/workflows.py) on small hand-written node definitions.
The live checks (node types exist, links type-check against /object_info, UI files up to date) are in
test_e2e_workflows.py."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
API_DIR = WORKFLOWS / "api"
API_FILES = sorted(API_DIR.glob("*.json"))
UI_FILES = sorted(WORKFLOWS.glob("*.json"))


def _load_generator():
    spec = importlib.util.spec_from_file_location("ws_workflows", ROOT / "scripts" / "workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


wf = _load_generator()


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


# -- the shipped files ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_workflow_is_well_formed(path):
    api = json.loads(path.read_text())
    assert isinstance(api, dict) and api, f"{path.name}: not an API-format workflow"
    assert "nodes" not in api, f"{path.name}: looks like UI format; API twins go in workflows/api/"
    for nid, node in api.items():
        assert set(node) >= {"class_type", "inputs"}, f"{path.name} node {nid}: needs class_type and inputs"
        for name, value in node["inputs"].items():
            if _is_link(value):
                assert value[0] in api, f"{path.name} node {nid} input {name}: links to missing node {value[0]}"
    assert any(n["class_type"].startswith("Weightsmith") for n in api.values()), f"{path.name}: uses no Weightsmith node"


def test_every_api_workflow_has_a_ui_twin_and_back():
    api = {wf.template_title(p) for p in API_FILES}  # a UI template is named by its title
    ui = {p.stem for p in UI_FILES}
    assert api - ui == set(), f"API workflows without a UI twin (run scripts/workflows.py): {sorted(api - ui)}"
    assert ui - api == set(), f"UI workflows without an API twin in workflows/api/: {sorted(ui - api)}"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_every_template_has_a_title_a_description_and_a_thumbnail(path):
    """ComfyUI's template browser shows a custom node's template by file name, with <name>.jpg as its picture."""
    from PIL import Image

    title = wf.template_title(path)
    assert title != path.stem and " " in title, f"{path.name}: give its note a '## Title' heading a user understands"
    note = path.with_suffix(".md").read_text()
    assert len([ln for ln in note.splitlines() if ln.strip() and not ln.startswith("#")]) >= 2, f"{path.name}: no description"
    thumb = WORKFLOWS / f"{title}{wf.THUMB_EXT}"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.size == wf.THUMB_SIZE
        colours = len(im.convert("RGB").resize((64, 40)).getcolors(64 * 40) or [])
    assert colours > 20, f"{thumb.name}: looks blank"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_opens_with_every_node_in_view(path):
    ui = json.loads(path.read_text())
    ds = ui["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    width, height = wf.VIEW_SIZE
    for n in ui["nodes"]:
        left, top = (n["pos"][0] + ox) * scale, (n["pos"][1] - wf.TITLE_HEIGHT + oy) * scale
        right, bottom = (n["pos"][0] + n["size"][0] + ox) * scale, (n["pos"][1] + n["size"][1] + oy) * scale
        assert 0 <= left and right <= width and 0 <= top and bottom <= height, (
            f"{path.name}: node {n['id']} ({n['type']}) is outside the {width}x{height} view when opened")


def check_ui_consistent(ui: dict, name: str) -> None:
    """Links agree with the slots that reference them (both ends), ids are unique, counters are right."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), f"{name}: duplicate node ids"
    assert ui["version"] == 0.4
    assert ui["last_node_id"] >= max(nodes)
    link_ids = [lk[0] for lk in ui["links"]]
    assert len(set(link_ids)) == len(link_ids), f"{name}: duplicate link ids"
    assert ui["last_link_id"] >= max(link_ids, default=0)
    for link_id, src, src_slot, dst, dst_slot, ltype in ui["links"]:
        assert src in nodes and dst in nodes, f"{name}: link {link_id} joins missing nodes"
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"], f"{name}: link {link_id} not listed on node {src} output {src_slot}"
        assert inp["link"] == link_id, f"{name}: node {dst} input {inp['name']} does not hold link {link_id}"
        assert out["type"] == ltype == inp["type"], f"{name}: link {link_id} types {out['type']}→{inp['type']} ({ltype})"
    listed = {lid for n in ui["nodes"] for o in n["outputs"] for lid in o["links"] or []}
    held = {i["link"] for n in ui["nodes"] for i in n["inputs"] if i.get("link") is not None}
    assert listed == held == set(link_ids), f"{name}: dangling links"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_consistent_with_its_api_twin(path):
    ui = json.loads(path.read_text())
    check_ui_consistent(ui, path.name)
    twin = wf.api_twin(path)
    api = json.loads(twin.read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    ids = wf._node_ids(api)
    real = {i: n["type"] for i, n in nodes.items() if n["type"] not in wf.VIRTUAL_TYPES}
    assert {ids[k]: v["class_type"] for k, v in api.items()} == real
    for nid, node in api.items():
        ui_node = nodes[ids[nid]]
        by_name = {i["name"]: i for i in ui_node["inputs"]}
        links = {lk[0]: lk for lk in ui["links"]}
        literals = []
        for name, value in node["inputs"].items():
            if _is_link(value):
                assert name in by_name, f"{path.name} node {nid}: input {name} is linked in API, not in UI"
                _, src, src_slot, _, _, _ = links[by_name[name]["link"]]
                assert (src, src_slot) == (ids[value[0]], value[1]), f"{path.name} node {nid} input {name}: wrong source"
            else:
                literals.append(json.dumps(value, sort_keys=True))
        have = Counter(json.dumps(v, sort_keys=True) for v in ui_node["widgets_values"])
        missing = Counter(literals) - have
        assert not missing, f"{path.name} node {nid}: API values not in widgets_values: {list(missing)}"


# -- the generator ------------------------------------------------------------------------------------

OBJECT_INFO = {
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["name"]}, "output": ["MODEL"], "output_name": ["MODEL"],
               "display_name": "Loader", "output_node": False},
    "Merge": {"input": {"required": {"model_a": ["MODEL", {}], "model_b": ["MODEL", {}],
                                     "ratio": ["FLOAT", {"default": 0.5}], "seed": ["INT", {"default": 0}],
                                     "method": ["COMBO", {"options": ["lerp", "slerp"], "control_after_generate": True}]},
                        "optional": {"note": ["STRING", {"default": "n", "multiline": True}],
                                     "strength": ["FLOAT", {"default": 1.0, "forceInput": True}]}},
              "input_order": {"required": ["model_a", "model_b", "ratio", "seed", "method"],
                              "optional": ["note", "strength"]},
              "output": ["MODEL", "LORA"], "output_name": ["merged", "lora"], "display_name": "Merge Things",
              "output_node": False},
    "Number": {"input": {"required": {"value": ["FLOAT", {"default": 0.0}]}}, "input_order": {"required": ["value"]},
               "output": ["FLOAT"], "output_name": ["FLOAT"], "display_name": "Number", "output_node": False},
    "Save": {"input": {"required": {"model": ["MODEL", {}], "prefix": ["STRING", {"default": "out"}]},
                       "hidden": {"prompt": "PROMPT"}},
             "input_order": {"required": ["model", "prefix"], "hidden": ["prompt"]},
             "output": [], "output_name": [], "display_name": "Save", "output_node": True},
}

API = {
    "1": {"class_type": "Loader", "inputs": {"name": "a.safetensors"}},
    "2": {"class_type": "Loader", "inputs": {"name": "b.safetensors"}},
    "3": {"class_type": "Number", "inputs": {"value": 0.25}},
    "4": {"class_type": "Merge", "inputs": {"model_a": ["1", 0], "model_b": ["2", 0], "ratio": ["3", 0], "seed": 7,
                                            "method": "slerp", "strength": ["3", 0]}, "_meta": {"title": "My merge"}},
    "5": {"class_type": "Save", "inputs": {"model": ["4", 0], "prefix": "x/y"}},
}


def test_generator_widgets_follow_input_order_with_control_values_and_defaults():
    ui = wf.api_to_ui(API, OBJECT_INFO, "t")
    merge = next(n for n in ui["nodes"] if n["id"] == 4)
    # ratio is linked: its widget keeps a placeholder; seed and the flagged combo get a control value after them;
    # the optional multiline `note` is absent from the API and takes its default.
    assert merge["widgets_values"] == [0.5, 7, "fixed", "slerp", "fixed", "n"]
    assert [i["name"] for i in merge["inputs"]] == ["model_a", "model_b", "ratio", "strength"]
    assert merge["inputs"][2]["widget"] == {"name": "ratio"} and "widget" not in merge["inputs"][3]
    assert merge["title"] == "My merge"
    assert [o["name"] for o in merge["outputs"]] == ["merged", "lora"]
    check_ui_consistent(ui, "t")


def test_generator_lays_out_left_to_right_and_orders_by_dependencies():
    ui = wf.api_to_ui(API, OBJECT_INFO, "t")
    pos = {n["id"]: n["pos"] for n in ui["nodes"]}
    order = {n["id"]: n["order"] for n in ui["nodes"]}
    assert pos[1][0] == pos[2][0] == pos[3][0] < pos[4][0] < pos[5][0]
    assert pos[1][1] < pos[2][1] < pos[3][1]
    assert max(order[1], order[2], order[3]) < order[4] < order[5]
    assert sorted(order.values()) == list(range(5))
    links = {(lk[1], lk[3]): lk[5] for lk in ui["links"]}
    assert links == {(1, 4): "MODEL", (2, 4): "MODEL", (3, 4): "FLOAT", (4, 5): "MODEL"}


def test_generator_puts_a_sidecar_note_above_the_graph(tmp_path):
    plain = wf.api_to_ui(API, OBJECT_INFO, "t")
    noted = wf.api_to_ui(API, OBJECT_INFO, "t", note="# Recipe\nMerge **a** and *b*.\n")
    note = next(n for n in noted["nodes"] if n["type"] == "MarkdownNote")
    assert note["widgets_values"] == ["# Recipe\nMerge **a** and *b*."] and note["id"] == noted["last_node_id"] == 6
    below = {n["id"]: n["pos"] for n in noted["nodes"] if n["type"] != "MarkdownNote"}
    assert all(below[n["id"]][1] >= note["pos"][1] + note["size"][1] for n in plain["nodes"])
    assert noted["links"] == plain["links"]
    check_ui_consistent(noted, "t")
    api_dir = tmp_path / "api"
    api_dir.mkdir()
    (api_dir / "one.json").write_text(json.dumps(API))
    (api_dir / "one.md").write_text("hello")
    wf.generate(OBJECT_INFO, api_dir, tmp_path)
    assert any(n["type"] == "MarkdownNote" for n in json.loads((tmp_path / "one.json").read_text())["nodes"])


def test_generator_is_deterministic():
    assert wf.dumps(wf.api_to_ui(API, OBJECT_INFO, "t")) == wf.dumps(wf.api_to_ui(json.loads(json.dumps(API)), OBJECT_INFO, "t"))


@pytest.mark.parametrize("mutate,needle", [
    (lambda a: a["4"].__setitem__("class_type", "Nope"), "unknown class_type 'Nope'"),
    (lambda a: a["4"]["inputs"].pop("seed"), "misses required input 'seed'"),
    (lambda a: a["4"]["inputs"].pop("model_b"), "misses required input 'model_b'"),
    (lambda a: a["4"]["inputs"].__setitem__("bogus", 1), "inputs its definition lacks: bogus"),
    (lambda a: a["5"]["inputs"].__setitem__("model", ["9", 0]), "links to missing node 9"),
    (lambda a: a["5"]["inputs"].__setitem__("model", ["4", 5]), "uses output 5 of node 4"),
    (lambda a: a["1"]["inputs"].__setitem__("name", ["5", 0]) or a["5"]["inputs"].__setitem__("model", ["1", 0]),
     "cycle"),
])
def test_generator_rejects_bad_workflows_with_a_clear_message(mutate, needle):
    api = json.loads(json.dumps(API))
    mutate(api)
    with pytest.raises(wf.WorkflowError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        wf.api_to_ui(api, OBJECT_INFO, "t")


def test_generator_check_mode_reports_stale_missing_and_orphan_files(tmp_path):
    api_dir, out_dir = tmp_path / "api", tmp_path
    api_dir.mkdir()
    (api_dir / "one.json").write_text(json.dumps(API))
    (api_dir / "two.json").write_text(json.dumps(API))
    assert wf.generate(OBJECT_INFO, api_dir, out_dir) == []
    assert wf.generate(OBJECT_INFO, api_dir, out_dir, check=True) == []
    (out_dir / "one.json").write_text("{}")
    (out_dir / "two.json").unlink()
    (out_dir / "orphan.json").write_text("{}")
    problems = wf.generate(OBJECT_INFO, api_dir, out_dir, check=True)
    assert any("one.json: out of date" in p for p in problems)
    assert any("two.json" in p and "missing" in p for p in problems)
    assert any("orphan.json: has no API twin" in p for p in problems)
    assert wf.main(["--object-info", str(_write(tmp_path / "oi.json", OBJECT_INFO)), "--api-dir", str(api_dir),
                    "--out-dir", str(out_dir), "--check"]) == 1
    assert wf.main(["--object-info", str(tmp_path / "oi.json"), "--api-dir", str(api_dir), "--out-dir", str(out_dir),
                    "one", "two"]) == 0
    assert json.loads((out_dir / "two.json").read_text())["nodes"]


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path
