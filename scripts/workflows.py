"""Generate the UI-format workflows (`workflows/<name>.json`, the templates ComfyUI offers) from their
API-format twins (`workflows/api/<name>.json`, what `/prompt` runs and the tests POST).

The API format names every input; the UI format (LiteGraph 0.4) stores widget values positionally and
sockets as numbered slots joined by links, so the conversion needs each node's definition from
`/object_info`: input order, widget vs socket, output types. An optional `workflows/api/<name>.md` beside an API twin
becomes a Markdown note at the top of the UI workflow (the recipe explained where the user sees it), and its
first heading is the template's title: ComfyUI's template browser shows a custom node's template by its file
name, so the UI file is `workflows/<title>.json`, with its thumbnail `workflows/<title>.jpg` beside it (the
name and extension frontend 1.32.9 asks for) — a picture of the graph drawn from the UI workflow itself.
The view a template opens at fits the whole graph into a laptop-sized canvas.
The source of that is a running server
(`--server URL`), a saved `/object_info` JSON (`--object-info FILE`), or, by default, a temporary
ComfyUI with the pack started just for this.

    python scripts/workflows.py                 # regenerate every workflows/<name>.json
    python scripts/workflows.py --check         # exit 1 when a committed UI file is stale or missing
    python scripts/workflows.py --server http://127.0.0.1:8188 merge_flux_guidance
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
API_DIR = WORKFLOWS / "api"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUE = "fixed"  # the value written for a control_after_generate widget: runs stay reproducible
NODE_WIDTH, REPORT_WIDTH, COLUMN_GAP, ROW_GAP, X0, Y0 = 400, 560, 60, 40, 50, 50
VIEW_OFFSET = [40, 60]  # canvas offset when opened: clear of the frontend's top bar
VIEW_SIZE = (1300, 720)  # the canvas a template must fit when opened (a 1440x900 window less the side/top bars)
VIEW_MARGIN = 30
THUMB_SIZE, THUMB_EXT = (640, 400), ".jpg"  # frontend 1.32.9 fetches <template name>.jpg for custom-node templates
TITLE_CHARS = re.compile(r"[^A-Za-z0-9 .,+()&-]")  # what a template title keeps: safe in file names and URLs
SLOT_HEIGHT, WIDGET_HEIGHT, TITLE_HEIGHT, MULTILINE_HEIGHT = 22, 24, 30, 90
VIRTUAL_TYPES = ("MarkdownNote", "Note")  # frontend-only nodes: not in /object_info, never executed
NOTE_HEIGHT_PER_LINE, NOTE_MIN_HEIGHT = 22, 80
UUID_NAMESPACE = uuid.UUID("6b1c5f4e-2f7a-4bde-9a51-9d1f0e8a7c31")


class WorkflowError(ValueError):
    pass


# -- node definitions -------------------------------------------------------------------------------

def input_specs(node_def: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, required) for every visible input, in the node's declared order."""
    inputs = node_def.get("input", {})
    order = node_def.get("input_order") or {s: list(inputs.get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = inputs.get(section, {}).get(name)
            if spec is None:
                continue
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            out.append((name, "COMBO" if isinstance(kind, list) else kind, opts, section == "required"))
    return out


def is_widget(kind: str, opts: dict) -> bool:
    return kind in WIDGET_TYPES and not opts.get("forceInput")


def has_control_widget(name: str, kind: str, opts: dict) -> bool:
    """The frontend adds a 'control after generate' widget after seed-like INTs and flagged combos;
    its value takes the next position in widgets_values."""
    if kind == "INT":
        return bool(opts.get("control_after_generate")) or name in ("seed", "noise_seed")
    return kind == "COMBO" and bool(opts.get("control_after_generate"))


def default_value(kind: str, opts: dict, spec: list):
    if "default" in opts:
        return opts["default"]
    if kind == "COMBO":
        options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        return options[0] if options else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def raw_spec(node_def: dict, name: str) -> list:
    for section in ("required", "optional"):
        spec = node_def.get("input", {}).get(section, {}).get(name)
        if spec is not None:
            return spec
    return []


# -- conversion -------------------------------------------------------------------------------------

def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _node_ids(api: dict) -> dict[str, int]:
    """API ids → UI ids: numeric ids are kept (so the twins read alike), others get the next free numbers."""
    ids = {k: int(k) for k in api if k.isdigit()}
    nxt = max(ids.values(), default=0) + 1
    for k in api:
        if k not in ids:
            ids[k] = nxt
            nxt += 1
    return ids


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(nid: str, stack: tuple[str, ...] = ()) -> int:
        if nid in depth:
            return depth[nid]
        if nid in stack:
            raise WorkflowError(f"workflow has a cycle through node {nid}")
        srcs = [v[0] for v in api[nid].get("inputs", {}).values() if _is_link(v)]
        depth[nid] = 1 + max((visit(s, (*stack, nid)) for s in srcs), default=-1)
        return depth[nid]

    for nid in api:
        visit(nid)
    return depth


def api_to_ui(api: dict, object_info: dict, name: str = "workflow", note: str | None = None) -> dict:
    """The UI-format (LiteGraph 0.4) workflow equivalent to API-format `api`, laid out left to right by depth,
    with `note` (Markdown) in a note node above the graph."""
    if not api:
        raise WorkflowError(f"{name}: empty workflow")
    for nid, node in api.items():
        ctype = node.get("class_type")
        if ctype not in object_info:
            raise WorkflowError(f"{name}: node {nid} has unknown class_type {ctype!r} (not in /object_info; "
                                "is the pack loaded and the node registered?)")
        for iname, value in node.get("inputs", {}).items():
            if _is_link(value) and value[0] not in api:
                raise WorkflowError(f"{name}: node {nid} input {iname!r} links to missing node {value[0]}")
    ids = _node_ids(api)
    depth = _depths(api)
    order = sorted(api, key=lambda k: (depth[k], ids[k]))
    exec_order = {nid: i for i, nid in enumerate(order)}

    nodes: dict[str, dict] = {}
    for nid in api:
        node_def = object_info[api[nid]["class_type"]]
        outputs = [{"name": oname, "type": otype, "links": [], "slot_index": i}
                   for i, (oname, otype) in enumerate(zip(node_def.get("output_name") or node_def["output"],
                                                            node_def["output"]))]
        nodes[nid] = {"def": node_def, "inputs": [], "outputs": outputs, "widgets_values": []}

    links: list[list] = []
    for nid in sorted(api, key=lambda k: ids[k]):
        node, entry = api[nid], nodes[nid]
        given = dict(node.get("inputs", {}))
        n_multiline = 0
        for iname, kind, opts, required in input_specs(entry["def"]):
            value = given.pop(iname, None)
            linked = _is_link(value)
            widget = is_widget(kind, opts)
            if widget:
                if value is None:
                    if required:
                        raise WorkflowError(f"{name}: node {nid} ({node['class_type']}) misses required input {iname!r}")
                    value = default_value(kind, opts, raw_spec(entry["def"], iname))
                if linked:
                    entry["widgets_values"].append(default_value(kind, opts, raw_spec(entry["def"], iname)))
                else:
                    entry["widgets_values"].append(value)
                if has_control_widget(iname, kind, opts):
                    entry["widgets_values"].append(CONTROL_VALUE)
                n_multiline += bool(opts.get("multiline"))
                if not linked:
                    continue
            elif value is None and required:
                raise WorkflowError(f"{name}: node {nid} ({node['class_type']}) misses required input {iname!r}")
            slot = {"name": iname, "type": kind, "link": None}
            if widget:
                slot["widget"] = {"name": iname}
            if linked:
                src, src_slot = value
                src_outputs = nodes[src]["outputs"]
                if src_slot >= len(src_outputs):
                    raise WorkflowError(f"{name}: node {nid} input {iname!r} uses output {src_slot} of node {src}, "
                                        f"which has {len(src_outputs)} outputs")
                link_id = len(links) + 1
                ltype = src_outputs[src_slot]["type"]
                links.append([link_id, ids[src], src_slot, ids[nid], len(entry["inputs"]), ltype])
                src_outputs[src_slot]["links"].append(link_id)
                slot["link"] = link_id
            entry["inputs"].append(slot)
        if given:
            raise WorkflowError(f"{name}: node {nid} ({node['class_type']}) has inputs its definition lacks: "
                                f"{', '.join(sorted(given))}")
        entry["multiline"] = n_multiline

    # Layout: one column per depth, nodes stacked in id order; sizes estimated from slots and widgets.
    # Output nodes are wider and taller: the web extension shows their report inside them.
    sizes = {}
    for nid, entry in nodes.items():
        n_widgets = len(entry["widgets_values"])
        n_slots = max(len(entry["inputs"]), len(entry["outputs"]))
        height = TITLE_HEIGHT + 10 + n_slots * SLOT_HEIGHT + n_widgets * WIDGET_HEIGHT + entry["multiline"] * MULTILINE_HEIGHT
        report = bool(entry["def"].get("output_node")) or "report" in (entry["def"].get("output_name") or [])
        sizes[nid] = [REPORT_WIDTH if report else NODE_WIDTH, height + (160 if report else 0)]
    column_x = {0: X0}
    for d in range(1, max(depth.values()) + 1):
        widths = [sizes[n][0] for n in api if depth[n] == d - 1]
        column_x[d] = column_x[d - 1] + max(widths, default=NODE_WIDTH) + COLUMN_GAP
    ui_nodes = []
    column_y: dict[int, float] = {}
    for nid in sorted(api, key=lambda k: (depth[k], ids[k])):
        entry, node = nodes[nid], api[nid]
        d = depth[nid]
        y = column_y.get(d, Y0)
        column_y[d] = y + sizes[nid][1] + ROW_GAP
        ui = {
            "id": ids[nid],
            "type": node["class_type"],
            "pos": [column_x[d], y],
            "size": sizes[nid],
            "flags": {},
            "order": exec_order[nid],
            "mode": 0,
            "inputs": entry["inputs"],
            "outputs": entry["outputs"],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": entry["widgets_values"],
        }
        title = node.get("_meta", {}).get("title")
        if title and title != entry["def"].get("display_name", node["class_type"]):
            ui["title"] = title
        ui_nodes.append(ui)
    last_id = max(ids.values())
    if note and note.strip():
        width = max(column_x.values()) + max(s[0] for s in sizes.values()) - X0
        height = max(NOTE_MIN_HEIGHT, NOTE_HEIGHT_PER_LINE * (note.strip().count("\n") + 2))
        for n in ui_nodes:
            n["pos"] = [n["pos"][0], n["pos"][1] + height + ROW_GAP]
        last_id += 1
        ui_nodes.append({"id": last_id, "type": "MarkdownNote", "pos": [X0, Y0], "size": [width, height], "flags": {},
                         "order": len(api), "mode": 0, "inputs": [], "outputs": [], "title": "About this workflow",
                         "properties": {}, "widgets_values": [note.strip()], "color": "#432", "bgcolor": "#653"})
    ui_nodes.sort(key=lambda n: n["id"])
    return {
        "id": str(uuid.uuid5(UUID_NAMESPACE, name)),
        "revision": 0,
        "last_node_id": last_id,
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": fitted_view(ui_nodes)},
        "version": 0.4,
    }


def fitted_view(nodes: list[dict], view: tuple[int, int] = VIEW_SIZE) -> dict:
    """The canvas scale and offset (LiteGraph: screen = (pos + offset) * scale) that show every node, title
    bars included, inside `view` when the workflow opens; never zoomed in beyond 1."""
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes) - TITLE_HEIGHT
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    scale = min(1.0, (view[0] - 2 * VIEW_MARGIN) / (x1 - x0), (view[1] - VIEW_OFFSET[1] - VIEW_MARGIN) / (y1 - y0))
    scale = round(scale, 3)
    return {"scale": scale, "offset": [round(VIEW_MARGIN / scale - x0, 1), round(VIEW_OFFSET[1] / scale - y0, 1)]}


def template_title(api_file: Path) -> str:
    """The title of a template: the first heading of the API twin's note, made safe as a file name; else the stem."""
    note = api_file.with_suffix(".md")
    if note.exists():
        for line in note.read_text().splitlines():
            if line.startswith("#"):
                title = re.sub(r" {2,}", " ", TITLE_CHARS.sub("", line.lstrip("#").strip())).strip(" .")
                if title:
                    return title
    return api_file.stem


def ui_file(api_file: Path, out_dir: Path = WORKFLOWS) -> Path:
    return out_dir / f"{template_title(api_file)}.json"


def api_twin(ui_path: Path, api_dir: Path = API_DIR) -> Path:
    """The API-format file a UI template was generated from (its title names it)."""
    for f in sorted(api_dir.glob("*.json")):
        if template_title(f) == ui_path.stem:
            return f
    raise WorkflowError(f"{ui_path.name}: no API workflow in {api_dir} has this title")


# -- thumbnails -------------------------------------------------------------------------------------------

def _node_colour(node: dict, info: dict) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(title bar, body) colours: our nodes in a warm tone, output nodes greener, notes brown, core grey."""
    if node["type"] in VIRTUAL_TYPES:
        return (102, 68, 34), (85, 51, 17)
    if info.get(node["type"], {}).get("output_node"):
        return (46, 110, 70), (44, 48, 52)
    if node["type"].startswith("Weightsmith"):
        return (150, 90, 40), (44, 48, 52)
    return (70, 74, 80), (44, 48, 52)


def _bezier(p0, p1, steps: int = 24) -> list[tuple[float, float]]:
    dx = max(abs(p1[0] - p0[0]) * 0.5, 40)
    c0, c1 = (p0[0] + dx, p0[1]), (p1[0] - dx, p1[1])
    pts = []
    for i in range(steps + 1):
        t = i / steps
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t * t, t ** 3
        pts.append((a * p0[0] + b * c0[0] + c * c1[0] + d * p1[0], a * p0[1] + b * c0[1] + c * c1[1] + d * p1[1]))
    return pts


def render_thumbnail(ui: dict, object_info: dict, size: tuple[int, int] = THUMB_SIZE) -> bytes:
    """A JPEG picture of the graph as the canvas lays it out: node boxes with their titles, links as curves."""
    from PIL import Image, ImageDraw, ImageFont

    nodes = {n["id"]: n for n in ui["nodes"]}
    x0 = min(n["pos"][0] for n in nodes.values())
    y0 = min(n["pos"][1] for n in nodes.values()) - TITLE_HEIGHT
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    pad = 16
    k = min((size[0] - 2 * pad) / (x1 - x0), (size[1] - 2 * pad) / (y1 - y0))
    ox = (size[0] - (x1 - x0) * k) / 2 - x0 * k
    oy = (size[1] - (y1 - y0) * k) / 2 - y0 * k

    def at(x: float, y: float) -> tuple[float, float]:
        return (x * k + ox, y * k + oy)

    img = Image.new("RGB", size, (32, 33, 36))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(9, round(15 * k)))
    for n in nodes.values():
        x, y = n["pos"]
        w, h = n["size"]
        bar, body = _node_colour(n, object_info)
        draw.rounded_rectangle([at(x, y - TITLE_HEIGHT), at(x + w, y + h)], radius=max(2, round(6 * k)), fill=body,
                               outline=(20, 20, 20))
        draw.rounded_rectangle([at(x, y - TITLE_HEIGHT), at(x + w, y)], radius=max(2, round(6 * k)), fill=bar)
        title = n.get("title") or object_info.get(n["type"], {}).get("display_name") or n["type"]
        tx, ty = at(x + 8, y - TITLE_HEIGHT + 7)
        max_w = w * k - 12
        while title and draw.textlength(title, font=font) > max_w:
            title = title[:-2] + "…" if len(title) > 2 else ""
        draw.text((tx, ty), title, fill=(235, 235, 235), font=font)
        if n["type"] in VIRTUAL_TYPES:  # the note: its heading, large (the body is too small to read here)
            heading = next((ln.lstrip("# ") for ln in (n["widgets_values"] or [""])[0].splitlines() if ln.strip()), "")
            big = ImageFont.load_default(size=max(12, round(30 * k)))
            draw.text(at(x + 14, y + 12), heading, fill=(240, 220, 190), font=big)
        else:  # one bar per widget, where the canvas draws them
            first = TITLE_HEIGHT - 20 + max(len(n["inputs"]), len(n["outputs"])) * SLOT_HEIGHT
            for i in range(len(n["widgets_values"])):
                top = y + first + i * WIDGET_HEIGHT
                if top + WIDGET_HEIGHT > y + h:
                    break
                draw.rounded_rectangle([at(x + 10, top + 3), at(x + w - 10, top + WIDGET_HEIGHT - 3)],
                                       radius=max(1, round(8 * k)), fill=(30, 32, 35))
        for i in range(len(n["inputs"])):
            draw.ellipse([at(x + 6, y + 10 + i * SLOT_HEIGHT), at(x + 14, y + 18 + i * SLOT_HEIGHT)], fill=(160, 160, 160))
        for i in range(len(n["outputs"])):
            draw.ellipse([at(x + w - 14, y + 10 + i * SLOT_HEIGHT), at(x + w - 6, y + 18 + i * SLOT_HEIGHT)],
                         fill=(160, 160, 160))
    for _, src, src_slot, dst, dst_slot, ltype in ui["links"]:
        a, b = nodes[src], nodes[dst]
        p0 = at(a["pos"][0] + a["size"][0] - 10, a["pos"][1] + 14 + src_slot * SLOT_HEIGHT)
        p1 = at(b["pos"][0] + 10, b["pos"][1] + 14 + dst_slot * SLOT_HEIGHT)
        colour = {"MODEL": (180, 160, 255), "LORA": (255, 190, 110), "IMAGE": (100, 200, 255)}.get(ltype, (170, 200, 170))
        draw.line(_bezier(p0, p1), fill=colour, width=max(2, round(3 * k)))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=88, optimize=True)
    return out.getvalue()


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


# -- files ------------------------------------------------------------------------------------------

def api_files(api_dir: Path = API_DIR, names: list[str] | None = None) -> list[Path]:
    files = sorted(api_dir.glob("*.json"))
    if names:
        wanted = {n.removesuffix(".json") for n in names}
        missing = wanted - {f.stem for f in files}
        if missing:
            raise WorkflowError(f"no API workflow named {', '.join(sorted(missing))} in {api_dir}")
        files = [f for f in files if f.stem in wanted]
    return files


def load_object_info(source: str) -> dict:
    if source.startswith(("http://", "https://")):
        import requests

        r = requests.get(source.rstrip("/") + "/object_info", timeout=60)
        r.raise_for_status()
        return r.json()
    return json.loads(Path(source).read_text())


def generate(object_info: dict, api_dir: Path = API_DIR, out_dir: Path = WORKFLOWS,
             names: list[str] | None = None, check: bool = False) -> list[str]:
    """Write (or with `check`, compare) every UI twin; returns the problems found (stale/missing/orphan files)."""
    problems = []
    files = api_files(api_dir, names)
    for f in files:
        note_file = f.with_suffix(".md")
        note = note_file.read_text() if note_file.exists() else None
        ui = api_to_ui(json.loads(f.read_text()), object_info, f.stem, note)
        text = dumps(ui)
        target = ui_file(f, out_dir)
        thumb = target.with_suffix(THUMB_EXT)
        if check:
            if not target.exists():
                problems.append(f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}: missing")
            elif target.read_text() != text:
                problems.append(f"{target.name}: out of date with api/{f.name}")
            if not thumb.exists():  # JPEG bytes vary between Pillow versions: its presence is what --check sees
                problems.append(f"{thumb.name}: thumbnail missing")
        else:
            if not target.exists() or target.read_text() != text:
                target.write_text(text)
                print(f"wrote {target}")
            picture = render_thumbnail(ui, object_info)
            if not thumb.exists() or thumb.read_bytes() != picture:
                thumb.write_bytes(picture)
                print(f"wrote {thumb}")
    if not names:
        titles = {ui_file(f, out_dir).stem for f in files}
        orphans = [p for p in sorted(out_dir.glob("*.json")) + sorted(out_dir.glob(f"*{THUMB_EXT}"))
                   if p.stem not in titles]
        if check:
            problems += [f"{p.name}: has no API twin in {api_dir.name}/" for p in orphans]
        else:
            for p in orphans:  # a renamed template leaves its old file behind: ComfyUI would list it twice
                p.unlink()
                print(f"removed {p} (no API twin)")
    return problems


def _object_info_from_temp_server() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from server_support import start_server

    with tempfile.TemporaryDirectory(prefix="weightsmith-wf-") as tmp:
        handle = start_server(tmp)
        try:
            return handle.client().object_info()
        finally:
            handle.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="workflow names (default: every workflows/api/*.json)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--server", help="URL of a running ComfyUI with the pack")
    src.add_argument("--object-info", help="a saved /object_info JSON file")
    ap.add_argument("--save-object-info", help="also save the /object_info used to this file")
    ap.add_argument("--check", action="store_true", help="only verify the committed UI files are up to date")
    ap.add_argument("--api-dir", type=Path, default=API_DIR)
    ap.add_argument("--out-dir", type=Path, default=WORKFLOWS)
    args = ap.parse_args(argv)
    try:
        if not api_files(args.api_dir, args.names):
            print(f"no API workflows in {args.api_dir}")
            return 0
        if args.server or args.object_info:
            info = load_object_info(args.server or args.object_info)
        else:
            print("starting a temporary ComfyUI for /object_info ...", file=sys.stderr)
            info = _object_info_from_temp_server()
        if args.save_object_info:
            Path(args.save_object_info).write_text(json.dumps(info))
        problems = generate(info, args.api_dir, args.out_dir, args.names, check=args.check)
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    if args.check:
        print("UI workflows up to date" if not problems else f"{len(problems)} UI workflow(s) need regenerating: "
              "python scripts/workflows.py")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
