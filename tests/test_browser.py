"""The real ComfyUI frontend (comfyui-frontend-package, served by the test server) in headless Chromium:
every shipped UI workflow loads with no missing-node warning and turns back into exactly its API twin,
and a queued workflow's report appears inside its node through web/weightsmith.js.

Users update the frontend package on its own, so every test runs in four variants: the frontend pinned
with ComfyUI 0.3.75 (1.32.9) and the newest one we checked (scripts/fetch_frontend.sh, served through
ComfyUI's `--front-end-root`), each in the classic canvas and in "Nodes 2.0" (Vue nodes,
`Comfy.VueNodes.Enabled`). The newest-frontend variants skip with the reason only when the wheel cannot
be fetched (offline).

Needs Debian's chromium and Playwright's Python package (scripts/setup_browser.sh); skipped with the
reason when either is missing. Screenshots go to test-artifacts/browser/<frontend>-<mode>/.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
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
FETCH_FRONTEND = ROOT / "scripts" / "fetch_frontend.sh"
FETCH_OFFLINE = 3  # fetch_frontend.sh's exit status when PyPI cannot be reached
# (frontend, mode): "pinned" is the frontend ComfyUI 0.3.75 requires (installed by setup_env.sh); "newest"
# the newest comfyui-frontend-package checked (pinned in fetch_frontend.sh). "nodes2" is the "Nodes 2.0"
# mode, where nodes are Vue components in the DOM instead of drawings on the canvas.
VARIANTS = [("pinned", "classic"), ("pinned", "nodes2"), ("newest", "classic"), ("newest", "nodes2")]
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"
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


def newest_frontend_root() -> Path:
    """The newest frontend's static folder (fetched once into .cache/frontends/); skips when offline."""
    proc = subprocess.run(["bash", str(FETCH_FRONTEND)], capture_output=True, text=True, timeout=600)
    if proc.returncode == FETCH_OFFLINE:
        pytest.skip(f"newest frontend not available offline: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"scripts/fetch_frontend.sh failed:\n{proc.stderr}"
    root = Path(proc.stdout.strip().splitlines()[-1])
    assert (root / "index.html").is_file(), root
    return root


@pytest.fixture(scope="module")
def newest_server(request):
    """A second ComfyUI (same models as the shared test server) serving the newest frontend."""
    from server_support import start_server

    root = newest_frontend_root()
    shared = request.getfixturevalue("comfy_server")
    models = [shared.base_dir / "models"]
    if os.environ.get("WEIGHTSMITH_E2E_MODELS"):
        models.append(Path(os.environ["WEIGHTSMITH_E2E_MODELS"]))
    base = Path(tempfile.mkdtemp(prefix="weightsmith-newest-frontend-"))
    handle = start_server(base, extra_model_roots=models, extra_args=["--front-end-root", str(root)])
    handle.owns_base = True
    try:
        yield handle
    finally:
        handle.dispose(keep_log_in=ROOT / "test-artifacts" / "newest-frontend")


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: "-".join(v))
def variant(request) -> tuple[str, str]:
    return request.param


@pytest.fixture(scope="module")
def server(request, variant):
    reason = unavailable()
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason}: CI installs both through scripts/setup_browser.sh, so this is a setup failure")
    if reason:
        pytest.skip(reason)
    frontend, mode = variant
    handle = request.getfixturevalue("comfy_server" if frontend == "pinned" else "newest_server")
    settings = {**SETTINGS, VUE_NODES_SETTING: mode == "nodes2"}
    requests.post(handle.url + "/settings", json=settings, timeout=10).raise_for_status()
    return handle


@pytest.fixture(scope="module")
def page(server, variant):
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="weightsmith-chromium-")
    shots = SHOTS / "-".join(variant)
    shots.mkdir(parents=True, exist_ok=True)
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
            # The mode really is the one asked for (the setting is read at startup from /settings).
            wanted = variant[1] == "nodes2"
            assert page_vue_mode(pg) == wanted, f"{variant}: {VUE_NODES_SETTING} is not {wanted} in the page"
            pg.js_errors = errors
            pg.shots = shots
            pg.variant = variant
            yield pg
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def page_vue_mode(page) -> bool:
    return bool(page.evaluate(f"() => app.extensionManager?.setting?.get('{VUE_NODES_SETTING}') ?? "
                              f"app.ui.settings.getSettingValue('{VUE_NODES_SETTING}')"))


def our_errors(page) -> list[str]:
    return [e for e in page.js_errors if "weightsmith" in e.lower() and not any(s in e for s in IGNORED_CONSOLE)]


def load(page, workflow: dict, name: str) -> None:
    page.keyboard.press("Escape")  # close any dialog left by a previous load
    page.evaluate("async ([wf, name]) => { await app.loadGraphData(wf, true, true, name); }", [workflow, name])
    page.wait_for_timeout(300)


# Each node's box on screen (title bar included): the Vue node's element in Nodes 2.0, else the node's
# graph bounds through the canvas transform.
NODE_RECTS_JS = """() => {
    const canvasRect = app.canvas.canvas.getBoundingClientRect();
    const ds = app.canvas.ds;
    return Object.fromEntries(app.graph.nodes.map(n => {
        const el = document.querySelector(`[data-node-id="${n.id}"]`);
        if (el) { const r = el.getBoundingClientRect(); return [n.id, [r.left, r.top, r.right, r.bottom]]; }
        const title = n.collapsed ? 0 : (LiteGraph.NODE_TITLE_HEIGHT ?? 30);
        const [x, y] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - title]);
        const [x2, y2] = ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
        return [n.id, [canvasRect.left + x, canvasRect.top + y, canvasRect.left + x2, canvasRect.top + y2]];
    }));
}"""


def fit_and_shoot(page, name: str) -> Path:
    """Fit the whole graph into the view (the frontend's own "Zoom to fit", which knows Nodes 2.0's node
    sizes), check that every node is on screen, and take a screenshot."""
    page.evaluate("""async () => {
        app.canvas.deselectAll?.();
        const cmd = app.extensionManager?.command;
        if (cmd) await cmd.execute('Comfy.Canvas.FitView'); else app.canvas.fitViewToSelectionAnimated?.({duration: 1});
        app.graph.setDirtyCanvas(true, true);
    }""")
    page.wait_for_timeout(600)
    path = page.shots / f"{name}.png"
    page.screenshot(path=str(path))
    view = page.evaluate("() => { const r = app.canvas.canvas.getBoundingClientRect(); "
                         "return [r.left, r.top, r.right, r.bottom]; }")
    off_screen = {nid: r for nid, r in page.evaluate(NODE_RECTS_JS).items()
                  if r[0] < view[0] - 1 or r[1] < view[1] - 1 or r[2] > view[2] + 1 or r[3] > view[3] + 1}
    assert not off_screen, f"{name}: nodes outside the fitted view {view}: {off_screen}"
    return path


MISSING_NODES_JS = """() => ({
    unregistered: app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
    errored: app.graph.nodes.filter(n => n.has_errors).map(n => n.type),
})"""


# Visible page text outside the graph's nodes (Nodes 2.0 draws nodes, widget labels included, as DOM) and
# outside our reports: where the frontends put their missing-node notices (1.32.9: a dialog "This workflow
# has missing nodes"; 1.58: a notice "Missing node: <type>").
PAGE_NOTICES_JS = """() => {
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    const texts = [];
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
        const el = n.parentElement;
        if (!el || el.closest('[data-node-id], .weightsmith-report, script, style') || !el.checkVisibility()) continue;
        if (n.textContent.trim()) texts.push(n.textContent.trim());
    }
    return texts;
}"""
MISSING_NOTICE = re.compile(r"missing nodes?\b|node types? .* not found", re.IGNORECASE)


def missing_node_warnings(page) -> list[str]:
    """The frontend's missing-nodes dialog/notice text, if shown."""
    return [t for t in page.evaluate(PAGE_NOTICES_JS) if MISSING_NOTICE.search(t)]


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


SHOWN_REPORTS_JS = """() => [...document.querySelectorAll('.weightsmith-report')].map(el => {
    const r = el.getBoundingClientRect();
    return { node: el.dataset.nodeId, summary: el.querySelector('.weightsmith-report-summary').textContent,
             text: el.querySelector('textarea').value, rect: [r.left, r.top, r.right, r.bottom],
             textHeight: el.querySelector('textarea').clientHeight,
             textNeeded: el.querySelector('textarea').scrollHeight,
             visible: r.height > 20 && el.checkVisibility(),
             vueNode: el.closest('[data-node-id]')?.dataset.nodeId ?? null };
})"""


def shown_reports(page) -> list[dict]:
    return page.evaluate(SHOWN_REPORTS_JS)


def assert_reports_inside_their_nodes(page, shown: list[dict]) -> None:
    """Each report panel is drawn within its node's box on screen (in Nodes 2.0: inside the node's own
    DOM element), not floating elsewhere over the canvas."""
    nodes = page.evaluate(NODE_RECTS_JS)
    vue = page_vue_mode(page)
    for item in shown:
        box, r = nodes[item["node"]], item["rect"]
        inside = r[0] >= box[0] - 2 and r[1] >= box[1] - 2 and r[2] <= box[2] + 2 and r[3] <= box[3] + 2
        assert inside, f"{page.variant}: report of node {item['node']} at {r} is outside its node {box}"
        if vue:
            assert item["vueNode"] == item["node"], f"{page.variant}: report not inside the Vue node element: {item}"
        # the text box shows the whole report, or at least several lines of it (then it scrolls)
        assert item["textHeight"] >= min(item["textNeeded"], 80) - 2, f"{page.variant}: report text box too small {item}"


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
    # (a node without widgets may serialize [] or undefined depending on the frontend: both mean none)
    widgets_before = page.evaluate("() => app.graph.serialize().nodes.map(n => [n.id, n.widgets_values ?? []])")
    t0 = time.monotonic()
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function(
        """(ids) => ids.every(id => app.graph.getNodeById(id)?.widgets?.some(w => w.name === 'weightsmith_report'))""",
        arg=reporters, timeout=120_000)
    elapsed = time.monotonic() - t0
    shot = fit_and_shoot(page, f"report-{path.stem}")  # fitted: every node (and its report) is on screen
    shown = shown_reports(page)
    assert shown, "no report element in the page"
    assert_reports_inside_their_nodes(page, shown)
    latest = requests.get(server.url + "/history?max_items=1", timeout=10).json()
    (entry,) = latest.values()
    assert entry["status"]["status_str"] == "success", entry["status"]
    for item in shown:
        ui = entry["outputs"].get(item["node"], {})
        assert item["text"] == ui["weightsmith_report"][0], "the node shows a different text than the server sent"
        assert item["summary"].strip() and item["visible"], item
    # The report widget is display only: saved workflows and prompts are unchanged by it.
    assert page.evaluate("() => app.graph.serialize().nodes.map(n => [n.id, n.widgets_values ?? []])") == widgets_before
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
    expected = [o["weightsmith_report"][0] for o in outputs.values() if "weightsmith_report" in o]
    fit_and_shoot(page, f"restored-{path.stem}")
    shown = shown_reports(page)
    assert sorted(item["text"] for item in shown) == sorted(expected)
    assert_reports_inside_their_nodes(page, shown)
    assert our_errors(page) == []


def test_newest_frontends_job_list_needs_an_api_comfyui_0375_lacks(page, server):
    """What does not work with the newest frontend on ComfyUI 0.3.75 (README, "Frontends"): its queue and
    job-history panels read GET /api/jobs, which this ComfyUI does not serve (404), so they stay empty and
    the frontend logs "[Jobs API]" errors. Running workflows, outputs, reports in nodes and templates work
    (the tests above). The pinned frontend never asks for /api/jobs."""
    assert requests.get(server.url + "/api/jobs?status=completed&limit=1", timeout=10).status_code == 404
    jobs_errors = [e for e in page.js_errors if "Jobs API" in e or "fetch jobs" in e]
    if page.variant[0] == "newest":
        assert jobs_errors, "the newest frontend no longer asks for /api/jobs: update README's Frontends section"
    else:
        assert jobs_errors == []


def test_an_error_in_a_weightsmith_node_is_titled_with_its_display_name(page, server):
    """ComfyUI names a failed node by its class; the frontend titles its error dialog with that, so the
    extension hands it the display name the user sees on the node."""
    if page.variant[0] == "newest":
        pytest.skip("the newest frontend (1.58) shows execution errors in its own error panel, not the .p-dialog "
                    "this test reads; its titles are not checked yet (known gap)")
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
