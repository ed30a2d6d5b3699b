// Weightsmith's frontend extension: shows each Weightsmith node's report inside the node.
//
// A Weightsmith node returns {"ui": {"weightsmith_report": [text], "weightsmith_json": [json]}}. ComfyUI
// sends that as the `executed` message's output; the frontend calls the node's onExecuted(output), and
// re-sends stored outputs through the extensions' onNodeOutputsUpdated when a queue/history item is
// opened. We render the text (tables, monospace) in a read-only DOM widget below the node's widgets, with
// a one-line summary above it. The widget is never serialized: saved workflows and /prompt payloads
// stay exactly what the node defines.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "weightsmith.report";
const WIDGET_NAME = "weightsmith_report";
const NODE_PREFIX = "Weightsmith";
const MIN_WIDTH = 420;
const MAX_TEXT_HEIGHT = 320;

const STYLE = `
.weightsmith-report { display: flex; flex-direction: column; gap: 4px; width: 100%; height: 100%;
  box-sizing: border-box; overflow: hidden; }
.weightsmith-report-summary { font: 600 12px sans-serif; color: var(--input-text, #ddd);
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; flex: 0 0 auto; }
.weightsmith-report-summary.weightsmith-error { color: #f77; }
textarea.weightsmith-report-text { flex: 1 1 auto; min-height: 40px; resize: none; box-sizing: border-box;
  width: 100%; margin: 0; padding: 4px 6px; font: 11px/1.35 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  white-space: pre; overflow: auto; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border: 1px solid var(--border-color, #444); border-radius: 4px; }
`;

function injectStyle() {
  if (document.getElementById("weightsmith-style")) return;
  const style = document.createElement("style");
  style.id = "weightsmith-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function first(value) {
  if (value == null) return null;
  return Array.isArray(value) ? (value.length ? value.join("\n") : null) : String(value);
}

/** The report text and its JSON data from a node's `ui` output (null when it has none). */
export function parseReport(output) {
  const text = first(output?.weightsmith_report);
  if (text == null) return null;
  let data = null;
  const raw = Array.isArray(output?.weightsmith_json) ? output.weightsmith_json[0] : output?.weightsmith_json;
  if (raw != null) {
    try {
      data = typeof raw === "string" ? JSON.parse(raw) : raw;
    } catch {
      data = null;
    }
  }
  return { text, data };
}

/** One line for the top of the report: the node's own `summary` text, else the first non-empty line. */
export function summaryLine(report) {
  const fromData = report.data && typeof report.data === "object" ? report.data.summary : null;
  if (typeof fromData === "string" && fromData.trim()) return fromData.trim();
  const line = report.text.split("\n").map((l) => l.trim()).find((l) => l.length > 0);
  return line ?? "";
}

function reportWidget(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (existing) return existing;
  injectStyle();
  const root = document.createElement("div");
  root.className = "weightsmith-report";
  const summary = document.createElement("div");
  summary.className = "weightsmith-report-summary";
  const text = document.createElement("textarea");
  text.className = "comfy-multiline-input weightsmith-report-text";
  text.readOnly = true;
  text.spellcheck = false;
  text.wrap = "off";
  text.setAttribute("aria-label", "Weightsmith report");
  root.append(summary, text);
  const widget = node.addDOMWidget(WIDGET_NAME, "weightsmith_report", root, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => text.value,
    setValue: () => {},
    getMinHeight: () => 90,
    getMaxHeight: () => MAX_TEXT_HEIGHT + 30,
  });
  widget.serialize = false;
  widget.weightsmith = { root, summary, text };
  return widget;
}

function showReport(node, output) {
  const report = parseReport(output);
  if (!report) return;
  const widget = reportWidget(node);
  const { root, summary, text } = widget.weightsmith;
  const line = summaryLine(report);
  summary.textContent = line;
  summary.title = line;
  summary.classList.toggle("weightsmith-error", /^(error|failed)\b/i.test(line));
  text.value = report.text;
  root.dataset.nodeId = String(node.id);
  node.weightsmithReport = report;
  // Grow the node to show the report, but never wider than MIN_WIDTH: wide tables scroll sideways in
  // the text box instead of pushing the node over its neighbours.
  const lines = report.text.split("\n").length;
  const wanted = Math.min(MAX_TEXT_HEIGHT, 16 * lines + 16) + 24;
  const width = Math.max(node.size[0], MIN_WIDTH);
  const computed = node.computeSize([width, node.size[1]]);
  node.setSize([width, Math.max(node.size[1], computed[1], wanted)]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas(true, true);
}

// ComfyUI names a failed node by its class (`node_type`), and the frontend titles its error dialog with
// it: for our nodes, show the display name the user sees on the node ("Compose LoRAs (Weightsmith)").
const displayNames = {};

function withDisplayName(type, detail) {
  const name = detail?.node_type;
  if (type !== "execution_error" || !name?.startsWith(NODE_PREFIX) || !displayNames[name]) return detail;
  return { ...detail, node_type: displayNames[name], class_type: name };
}

const dispatch = api.dispatchCustomEvent?.bind(api);
if (dispatch) api.dispatchCustomEvent = (type, detail) => dispatch(type, withDisplayName(type, detail));

app.registerExtension({
  name: EXTENSION,

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(NODE_PREFIX)) return;
    if (nodeData.display_name) displayNames[nodeData.name] = nodeData.display_name;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const r = onExecuted?.apply(this, arguments);
      showReport(this, output);
      return r;
    };
  },

  // Outputs restored from the queue/history panel (opening a finished run) arrive here, not in onExecuted.
  onNodeOutputsUpdated(nodeOutputs) {
    for (const [id, output] of Object.entries(nodeOutputs ?? {})) {
      const node = app.graph?.getNodeById(Number.isNaN(Number(id)) ? id : Number(id));
      if (node?.type?.startsWith(NODE_PREFIX)) showReport(node, output);
    }
  },
});
