"""The real ComfyUI frontend (comfyui-frontend-package, served by the test server) in headless Chromium:
every shipped UI workflow loads with no missing-node warning and turns back into exactly its API twin,
and a queued workflow's report appears inside its node through web/weightsmith.js.

Needs Debian's chromium and Playwright's Python package (scripts/setup_browser.sh); skipped with the
reason when either is missing. Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
API_DIR = ROOT / "workflows" / "api"


def _generator():
    spec = importlib.util.spec_from_file_location("ws_workflows_browser", ROOT / "scripts" / "workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


wf = _generator()  # api_twin: the API file a UI template (named by its title) was generated from
SHOTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("WEIGHTSMITH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# First-run screens that would cover the canvas (the templates browser, the "Nodes 2.0" banner) off, and
# full-detail drawing at any zoom, so screenshots of a fitted graph show the widgets and their values.
SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 1}
INIT_SCRIPT = "localStorage.setItem('vueNodesBannerDismissed', 'true');"
# The frontend itself logs these on a machine with no network; they are not ours.
IGNORED_CONSOLE = ("Failed to load resource", "Content Security Policy", "api.comfy.org")


def unavailable() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (run scripts/setup_browser.sh)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (run scripts/setup_browser.sh)"
    return None


@pytest.fixture(scope="module")
def server(request):
    reason = unavailable()
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason}: CI installs both through scripts/setup_browser.sh, so this is a setup failure")
    if reason:
        pytest.skip(reason)
    handle = request.getfixturevalue("comfy_server")
    requests.post(handle.url + "/settings", json=SETTINGS, timeout=10).raise_for_status()
    return handle


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="weightsmith-chromium-")
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1800, "height": 1100})
            # Only the test server is reachable: anything else is refused before it leaves the browser.
            ctx.route("**/*", lambda route: route.continue_()
                      if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost") else route.abort())
            ctx.add_init_script(INIT_SCRIPT)
            pg = ctx.pages[0] if ctx.pages else ctx.new_page()
            errors: list[str] = []
            pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            pg.on("pageerror", lambda e: errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
            pg.goto(server.url)
            pg.wait_for_function("() => window.app?.graph && window.app.canvas && "
                                 "window.app.extensions?.some(e => e.name === 'weightsmith.report')", timeout=90_000)
            pg.js_errors = errors
            yield pg
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def our_errors(page) -> list[str]:
    return [e for e in page.js_errors if "weightsmith" in e.lower() and not any(s in e for s in IGNORED_CONSOLE)]


def load(page, workflow: dict, name: str) -> None:
    page.keyboard.press("Escape")  # close any dialog left by a previous load
    page.evaluate("async ([wf, name]) => { await app.loadGraphData(wf, true, true, name); }", [workflow, name])
    page.wait_for_timeout(300)


def fit_and_shoot(page, name: str) -> Path:
    page.evaluate("() => { app.canvas.deselectAll?.(); app.canvas.fitViewToSelectionAnimated?.({duration: 1}); "
                  "app.graph.setDirtyCanvas(true, true); }")
    page.wait_for_timeout(400)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


MISSING_NODES_JS = """() => ({
    unregistered: app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
    errored: app.graph.nodes.filter(n => n.has_errors).map(n => n.type),
})"""


def missing_node_warnings(page) -> list[str]:
    """The frontend's missing-nodes dialog/toast text, if shown."""
    texts = page.locator(".p-dialog, .p-toast-message").all_inner_texts()
    return [t for t in texts if "missing" in t.lower() or "not found" in t.lower()]


def test_the_extension_loads_without_errors(page):
    assert page.evaluate("() => app.extensions.some(e => e.name === 'weightsmith.report')")
    assert our_errors(page) == []


def test_a_missing_node_is_detected(page):
    """The negative control for the loads below: an unknown node type IS reported, so their silence counts."""
    bogus = {"last_node_id": 1, "last_link_id": 0, "version": 0.4, "links": [], "groups": [], "config": {}, "extra": {},
             "nodes": [{"id": 1, "type": "WeightsmithNoSuchNode", "pos": [100, 100], "size": [300, 100], "flags": {},
                        "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": []}]}
    load(page, bogus, "missing-node-control")
    found = page.evaluate(MISSING_NODES_JS)
    page.wait_for_timeout(500)
    warnings = missing_node_warnings(page)
    fit_and_shoot(page, "missing-node-control")
    assert "WeightsmithNoSuchNode" in found["unregistered"] + found["errored"]
    assert warnings, "the frontend showed no missing-node warning for an unknown node type"
    page.keyboard.press("Escape")


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_loads_with_no_missing_nodes_and_matches_its_api_twin(page, path):
    workflow = json.loads(path.read_text())
    load(page, workflow, path.stem)
    found = page.evaluate(MISSING_NODES_JS)
    assert found == {"unregistered": [], "errored": []}, f"{path.name}: {found}"
    assert missing_node_warnings(page) == []
    # What the frontend would POST for this graph is exactly the API twin.
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    api = json.loads(wf.api_twin(path).read_text())
    strip = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in api.items()}
    got = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in prompt.items()}
    assert got == strip, f"{path.name}: the frontend's prompt differs from {wf.api_twin(path).relative_to(ROOT)}"
    fit_and_shoot(page, f"loaded-{path.stem}")
    assert our_errors(page) == []


def _report_workflow() -> Path | None:
    """A small shipped workflow with a Weightsmith output node (the report is what this test looks at)."""
    for p in UI_FILES:
        api = json.loads(wf.api_twin(p).read_text())
        big = any(isinstance(v, str) and "-3072" in v for n in api.values() for v in n["inputs"].values())
        # a node that writes a file is an output node: it runs again for the fresh prefix and shows its report
        if not big and any(n["class_type"].startswith("Weightsmith") and "filename_prefix" in n["inputs"]
                           for n in api.values()):
            return p
    return None


def test_queued_workflow_shows_its_report_in_the_node(page, server):
    path = _report_workflow()
    if path is None:
        pytest.skip("no small shipped workflow with a Weightsmith node yet")
    load(page, json.loads(path.read_text()), path.stem)
    tag = uuid.uuid4().hex[:6]
    # A fresh output name, so the run really executes (not ComfyUI's cache) and writes a new file.
    before = page.evaluate("""(tag) => app.graph.nodes.map(n => {
        for (const w of n.widgets ?? []) if (w.name.includes('prefix') && typeof w.value === 'string') w.value += '_' + tag;
        return [n.id, n.type, [...(n.widgets_values ?? n.widgets?.map(w => w.value) ?? [])]];
    })""", tag)
    defs = page.evaluate("() => Object.fromEntries(app.graph.nodes.map(n => [n.id, !!n.constructor.nodeData?.output_node]))")
    reporters = [nid for nid, ntype, _ in before if ntype.startswith("Weightsmith") and defs[str(nid)]]
    assert reporters, f"{path.name}: no Weightsmith output node found in the loaded graph"
    widgets_before = page.evaluate("() => app.graph.serialize().nodes.map(n => [n.id, n.widgets_values])")
    t0 = time.monotonic()
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function(
        """(ids) => ids.every(id => app.graph.getNodeById(id)?.widgets?.some(w => w.name === 'weightsmith_report'))""",
        arg=reporters, timeout=120_000)
    elapsed = time.monotonic() - t0
    shot = fit_and_shoot(page, f"report-{path.stem}")  # fitted: every node (and its report) is on screen
    shown = page.evaluate("""() => [...document.querySelectorAll('.weightsmith-report')].map(el => ({
        node: el.dataset.nodeId, summary: el.querySelector('.weightsmith-report-summary').textContent,
        text: el.querySelector('textarea').value, visible: el.getBoundingClientRect().height > 20
            && el.checkVisibility() }))""")
    assert shown, "no report element in the page"
    latest = requests.get(server.url + "/history?max_items=1", timeout=10).json()
    (entry,) = latest.values()
    assert entry["status"]["status_str"] == "success", entry["status"]
    for item in shown:
        ui = entry["outputs"].get(item["node"], {})
        assert item["text"] == ui["weightsmith_report"][0], "the node shows a different text than the server sent"
        assert item["summary"].strip() and item["visible"], item
    # The report widget is display only: saved workflows and prompts are unchanged by it.
    assert page.evaluate("() => app.graph.serialize().nodes.map(n => [n.id, n.widgets_values])") == widgets_before
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert not any("weightsmith_report" in n["inputs"] for n in prompt.values())
    assert our_errors(page) == []
    assert shot.stat().st_size > 10_000, f"screenshot {shot} looks empty (ran in {elapsed:.1f}s)"


def test_outputs_restored_from_history_show_the_report(page, server):
    """Opening a finished run from the queue/history panel hands its outputs to onNodeOutputsUpdated."""
    path = _report_workflow()
    if path is None:
        pytest.skip("no small shipped workflow with a Weightsmith node yet")
    history = requests.get(server.url + "/history?max_items=50", timeout=10).json()
    api_types = {nid: n["class_type"] for nid, n in json.loads(wf.api_twin(path).read_text()).items()}
    outputs = next((h["outputs"] for h in reversed(list(history.values()))
                    if {nid: n["class_type"] for nid, n in h["prompt"][2].items()} == api_types
                    and any("weightsmith_report" in o for o in h["outputs"].values())), None)
    if outputs is None:
        pytest.skip(f"no finished run of {path.stem} in /history (the queue test runs first)")
    load(page, json.loads(path.read_text()), f"{path.stem}-restored")
    assert page.evaluate("() => document.querySelectorAll('.weightsmith-report').length") == 0
    page.evaluate("(outputs) => { app.nodeOutputs = outputs; }", outputs)
    page.wait_for_function("() => document.querySelectorAll('.weightsmith-report textarea').length > 0", timeout=10_000)
    texts = page.evaluate("() => [...document.querySelectorAll('.weightsmith-report textarea')].map(t => t.value)")
    expected = [o["weightsmith_report"][0] for o in outputs.values() if "weightsmith_report" in o]
    assert sorted(texts) == sorted(expected)
    fit_and_shoot(page, f"restored-{path.stem}")
    assert our_errors(page) == []


def test_an_error_in_a_weightsmith_node_is_titled_with_its_display_name(page, server):
    """ComfyUI names a failed node by its class; the frontend titles its error dialog with that, so the
    extension hands it the display name the user sees on the node."""
    prompt = {"1": {"class_type": "WeightsmithMergeFiles", "inputs": {
        "model_a": "diffusion_models/weightsmith_demo/sd15-tiny-a.safetensors",
        "model_b": "diffusion_models/weightsmith_demo/sd15-tiny-b.safetensors", "method": "weighted_sum",
        "ratio": 0.5, "weights": "", "rules": "", "params": f"no_such_param_{uuid.uuid4().hex[:4]}=1",
        "preset": "none", "missing": "take", "other_keys": "copy", "dtype": "keep", "dry_run": True,
        "output_folder": "diffusion_models", "filename_prefix": "never/x", "model_c": "none", "model_d": "none"}}}
    page.keyboard.press("Escape")
    page.evaluate("async (p) => { await (window.app.api ?? window.comfyAPI.api.api).queuePrompt(0, {output: p, workflow: {}}); }", prompt)
    dialog = page.locator(".p-dialog").filter(has_text="no_such_param")
    dialog.wait_for(timeout=60_000)
    text = dialog.inner_text()
    assert "Merge Model Files (Weightsmith)" in text, text[:500]
    assert "WeightsmithMergeFiles" not in text.split("\n")[0], text[:300]
    fit_and_shoot(page, "error-dialog-display-name")
    page.keyboard.press("Escape")
