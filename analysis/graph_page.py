"""graph.html: a static view of an attribution graph, one file that opens from disk with no server.

Layers run up the page: the input tokens at the bottom, then every layer's features and error
nodes, then the logits at the top; positions run across under the prompt's tokens. A node's size
is its influence on the logits, an edge's width its weight (blue adds, red takes away). Clicking a
node, or opening graph.html#node=<node id>, shows its numbers, its strongest edges in and out and,
for a feature, the held-out contexts where it is largest. The data is in the page (`const GRAPH`)."""

from __future__ import annotations

import html
import json
import os

PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; display: flex; color: #222; }
  #view { flex: 1; overflow: auto; padding: 12px; }
  #panel { width: 380px; border-left: 1px solid #ddd; padding: 12px; height: 100vh; overflow: auto; box-sizing: border-box; }
  h1 { font-size: 16px; margin: 0 0 4px; } h2 { font-size: 15px; margin: 0 0 6px; } .muted { color: #777; font-size: 12px; }
  circle { cursor: pointer; stroke: #333; stroke-width: 0.5; } circle.chosen { stroke: #000; stroke-width: 2.5; }
  line { stroke-opacity: 0.45; } line.lit { stroke-opacity: 0.95; }
  text { font-size: 11px; font-family: ui-monospace, monospace; }
  table { border-collapse: collapse; font-size: 12px; } td { padding: 1px 6px; }
  .context { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; margin: 3px 0; }
  .tok { border-radius: 2px; } .value { color: #555; display: inline-block; width: 52px; }
</style></head>
<body><div id="view"><h1>__TITLE__</h1><div class="muted" id="summary"></div><svg id="graph"></svg></div>
<section id="panel"><p class="muted">Click a node.</p></section>
<script>
const GRAPH = __DATA__;
const NS = "http://www.w3.org/2000/svg", colors = {"cross layer transcoder": "#f4a261", "mlp reconstruction error": "#bbbbbb",
  "embedding": "#8ecae6", "logit": "#90be6d"};
function el(name, attrs, parent) { const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]); parent.appendChild(e); return e; }
function esc(s) { return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
const T = GRAPH.prompt_tokens.length, rows = GRAPH.layers + 2, cell = 96, rowH = 70, left = 70, above = 20;
const byId = {}, place = {};
GRAPH.nodes.forEach(n => byId[n.node_id] = n);
const row = n => n.layer === "E" ? 0 : (n.feature_type === "logit" ? rows - 1 : Number(n.layer) + 1);
const groups = {};
GRAPH.nodes.forEach(n => { const key = row(n) + ":" + n.ctx_idx; (groups[key] = groups[key] || []).push(n); });
for (const key in groups) {
  const g = groups[key], [r, p] = key.split(":").map(Number);
  g.forEach((n, i) => place[n.node_id] = [left + p * cell + cell / 2 + (i - (g.length - 1) / 2) * Math.min(14, (cell - 10) / g.length),
                                          above + (rows - 1 - r) * rowH + rowH / 2]);
}
const svg = document.getElementById("graph");
svg.setAttribute("width", left + T * cell + 10); svg.setAttribute("height", above + rows * rowH + 40);
for (let r = 0; r < rows; r++) el("text", {x: 4, y: above + (rows - 1 - r) * rowH + rowH / 2 + 4}, svg).textContent =
  r === 0 ? "tokens" : (r === rows - 1 ? "logits" : "layer " + (r - 1));
GRAPH.prompt_tokens.forEach((t, p) => el("text", {x: left + p * cell + cell / 2, y: above + rows * rowH + 14, "text-anchor": "middle"}, svg).textContent = t);
const largest = Math.max(1e-12, ...GRAPH.links.map(l => Math.abs(l.weight)));
const lines = GRAPH.links.map(l => { const [x1, y1] = place[l.source], [x2, y2] = place[l.target];
  const line = el("line", {x1, y1, x2, y2, stroke: l.weight > 0 ? "#2563eb" : "#dc2626",
    "stroke-width": 0.4 + 4 * Math.abs(l.weight) / largest}, svg); line.dataset.source = l.source; line.dataset.target = l.target; return line; });
GRAPH.nodes.forEach(n => { const [x, y] = place[n.node_id];
  const c = el("circle", {cx: x, cy: y, r: 3 + 9 * Math.sqrt(n.size || 0), fill: colors[n.feature_type] || "#999"}, svg);
  c.dataset.node = n.node_id; c.addEventListener("click", () => { location.hash = "node=" + encodeURIComponent(n.node_id); });
  el("title", {}, c).textContent = label(n); });
document.getElementById("summary").textContent = GRAPH.summary;
function index(n) { return n.node_id.split("_")[1]; }  // a feature's index in its layer (its id: layer_index_position)
function label(n) {
  if (n.feature_type === "embedding") return "token " + JSON.stringify(GRAPH.prompt_tokens[n.ctx_idx]) + " at " + n.ctx_idx;
  if (n.feature_type === "logit") return n.clerp;
  if (n.feature_type === "mlp reconstruction error") return "error of MLP " + n.layer + " at " + n.ctx_idx;
  return "feature " + index(n) + " of layer " + n.layer + " at " + n.ctx_idx;
}
function edgeRows(list, other) {
  return list.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 12).map(l =>
    `<tr><td>${l.weight.toFixed(4)}</td><td><a href="#node=${encodeURIComponent(l[other])}">${esc(label(byId[l[other]]))}</a></td></tr>`).join("");
}
function show() {
  const id = decodeURIComponent((location.hash.match(/node=([^&]*)/) || [])[1] || "");
  const n = byId[id], panel = document.getElementById("panel");
  document.querySelectorAll("circle").forEach(c => c.classList.toggle("chosen", c.dataset.node === id));
  lines.forEach(l => l.classList.toggle("lit", l.dataset.source === id || l.dataset.target === id));
  if (!n) { panel.innerHTML = id ? `<p>No node ${esc(id)} in this graph.</p>` : '<p class="muted">Click a node.</p>'; return; }
  let text = `<h2>${esc(label(n))}</h2><table>` +
    (n.activation != null ? `<tr><td>activation</td><td>${n.activation.toFixed(4)}</td></tr>` : "") +
    `<tr><td>influence</td><td>${(n.size || 0).toFixed(4)} of the largest</td></tr></table>`;
  const ins = GRAPH.links.filter(l => l.target === id), outs = GRAPH.links.filter(l => l.source === id);
  if (ins.length) text += `<h3>Strongest edges in</h3><table>${edgeRows(ins, "source")}</table>`;
  if (outs.length) text += `<h3>Strongest edges out</h3><table>${edgeRows(outs, "target")}</table>`;
  const contexts = GRAPH.contexts[n.layer + ":" + index(n)];
  if (n.feature_type === "cross layer transcoder" && contexts) {
    text += "<h3>Top contexts</h3>" + contexts.map(c => `<div class="context"><span class="value">${c.value.toFixed(3)}</span>` +
      c.tokens.map((t, i) => `<span class="tok" style="background: rgba(244,162,97,${Math.max(0, Math.min(1, c.values[i] / c.value))})">${esc(t)}</span>`).join(GRAPH.joined ? "" : " ") + "</div>").join("");
  }
  panel.innerHTML = text;
  panel.dataset.node = id;
}
window.addEventListener("hashchange", show);
show();
</script></body></html>
"""


def write_graph_page(path: str, document: dict, layers: int, sizes: dict[str, float], contexts: dict,
                     joined: bool, summary: str) -> str:
    """graph.html at `path` from graph.json's `document`: `sizes` maps node ids to their influence
    (the largest 1), `contexts` "layer:feature" to [{tokens, values, value}], `joined`: the tokens are
    pieces of text (else shown apart)."""
    nodes = [{**node, "size": sizes.get(node["node_id"], 0.0)} for node in document["nodes"]]
    data = {"nodes": nodes, "links": document["links"], "prompt_tokens": document["metadata"]["prompt_tokens"],
            "layers": layers, "contexts": contexts, "joined": joined, "summary": summary}
    title = html.escape(f"Attribution graph: {document['metadata']['prompt']}")
    text = PAGE.replace("__TITLE__", title).replace("__DATA__", json.dumps(data).replace("</", "<\\/"))
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path
